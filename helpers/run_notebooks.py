"""Execute the numbered notebooks in order, headless: ``python -m helpers.run_notebooks``.

Used by ``make tutorial`` (copies into build/, committed notebooks untouched) and ``make notebooks``
(refreshes the stored outputs in place). Prints each notebook's wall time.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run(path: Path, out: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies")
    where.add_argument("--in-place", action="store_true", help="overwrite the committed notebooks")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 02 03")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only))]
    total = 0.0
    for path in paths:
        out = path if args.in_place else args.out / path.name
        try:
            seconds = run(path, out, args.timeout)
        except CellExecutionError as exc:
            print(f"{path.name}: FAILED — see {out}\n{str(exc).splitlines()[-1] if str(exc) else exc}", file=sys.stderr)
            return 1
        total += seconds
        print(f"{path.name}: {seconds:6.1f} s", flush=True)
    print(f"all notebooks: {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
