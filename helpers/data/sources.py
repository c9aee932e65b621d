"""Getting a profile's data onto disk: the corpus file and the HoVer folder (02 and 03).

In the mini profile the "remote" is a folder in the cache where ``prepare`` publishes the generated
mini world; from there on both profiles run the same fetch / verify / extract code.
"""

from pathlib import Path

from helpers.data import downloads, mini_world
from helpers.profiles import Profile
from helpers.util.errors import TutorialError


def prepare(profile: Profile) -> None:
    """Mini: generate and publish the mini world if it is not there yet (about 3 s). Full: nothing."""
    if profile.name == "mini":
        expected = {mini_world.CORPUS_ARCHIVE: profile.corpus.sha256}
        expected.update({f"{mini_world.HOVER_FOLDER}/{rel}": sha for rel, sha in profile.hover_sha256.items()})
        mini_world.publish(profile.source_dir, seed=profile.seed, expected=expected)


def corpus_archive(profile: Profile, progress: bool = True) -> Path:
    """The verified corpus archive in the cache, downloaded (or resumed) only if needed."""
    return downloads.fetch(profile.corpus.url, profile.downloads_dir, sha256=profile.corpus.sha256, progress=progress)


def corpus_file(profile: Profile, progress: bool = True) -> Path:
    """The extracted ``wiki.abstracts.2017.jsonl``."""
    return downloads.extract_member(corpus_archive(profile, progress), profile.corpus.member, profile.data_dir,
                                    expected_lines=profile.corpus.lines)


def hover_folder(profile: Profile) -> str:
    """The dataset to hand to ``datasets.load_dataset``: a hub id, or a local folder verified by sha256."""
    if not profile.hover_sha256:
        return profile.hover_dataset
    folder = Path(profile.hover_dataset)
    for rel, expected in profile.hover_sha256.items():
        path = folder / rel
        if not path.exists():
            raise TutorialError(f"HoVer file {path} is missing: run the first data cell of 02_corpus_indexing (sources.prepare)")
        if downloads.sha256_of(path) != expected:
            raise TutorialError(f"HoVer file {path.name} fails its sha256 check: delete {folder} and run sources.prepare again")
    return str(folder)
