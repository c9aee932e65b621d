"""Reading ``wiki.abstracts.2017.jsonl`` into the seeds' ``"title | text"`` strings (02_corpus_indexing)."""

from pathlib import Path

import ujson

from helpers.util.errors import TutorialError


def load_abstracts(path: Path) -> list[str]:
    """One ``"title | sentence sentence …"`` string per abstract, exactly as the seed builds its corpus."""
    path = Path(path)
    if not path.exists():
        raise TutorialError(f"corpus file {path} is missing: run the download and extract cells of 02_corpus_indexing")
    corpus = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TutorialError(f"{path.name} line {number} is not valid UTF-8 (byte {exc.start + 1}): delete the file and extract it again") from None
            if not line.strip():
                continue
            try:
                row = ujson.loads(line)
                title, text = row["title"], row["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise TutorialError(f"{path.name} line {number} is not a {{title, text}} JSON object ({exc}): delete the file and extract it again") from None
            if type(title) is not str:
                raise TutorialError(f"{path.name} line {number}: title must be a string, got {type(title).__name__}: delete the file and extract it again")
            if type(text) is not list or not all(type(s) is str for s in text):
                raise TutorialError(f"{path.name} line {number}: text must be a list of strings (sentences), got {type(text).__name__}: delete the file and extract it again")
            doc = f"{title} | {' '.join(text)}"
            if "\\u" in line:  # only a JSON escape can make a lone surrogate; UTF-8 input cannot
                try:
                    doc.encode("utf-8")
                except UnicodeEncodeError:
                    raise TutorialError(f"{path.name} line {number} is not valid Unicode (a lone surrogate escape such as \\ud800): delete the file and extract it again") from None
            corpus.append(doc)
    if not corpus:
        raise TutorialError(f"corpus file {path} is empty: delete it and run the extract cell again")
    return corpus
