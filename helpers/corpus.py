"""Reading ``wiki.abstracts.2017.jsonl`` into the seeds' ``"title | text"`` strings (02_corpus_indexing)."""

from pathlib import Path

import ujson

from helpers.errors import TutorialError


def load_abstracts(path: Path) -> list[str]:
    """One ``"title | sentence sentence …"`` string per abstract, exactly as the seed builds its corpus."""
    path = Path(path)
    if not path.exists():
        raise TutorialError(f"corpus file {path} is missing: run the download and extract cells of 02_corpus_indexing")
    corpus = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = ujson.loads(line)
                corpus.append(f"{row['title']} | {' '.join(row['text'])}")
            except (ValueError, KeyError, TypeError) as exc:
                raise TutorialError(f"{path.name} line {number} is not a {{title, text}} JSON object ({exc}): delete the file and extract it again") from None
    if not corpus:
        raise TutorialError(f"corpus file {path} is empty: delete it and run the extract cell again")
    return corpus
