"""Execute the numbered notebooks in order, headless: ``python -m helpers.tools.run_notebooks``.

Used by ``make tutorial`` (copies into build/, committed notebooks untouched) and ``make notebooks``
(refreshes the stored outputs in place). Prints each notebook's wall time.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _kernel_config(sockets: str) -> Config:
    """Talk to the kernel over local IPC sockets in ``sockets``: no TCP port, so no unencrypted-TCP warning."""
    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = os.path.join(sockets, "kernel")  # absolute: the kernel runs in the notebook's folder
    return config


def run(path: Path, out: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlmh-kernel-") as sockets:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=_kernel_config(sockets),
                                resources={"metadata": {"path": str(path.parent)}})
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
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="folder of the numbered notebooks")
    args = parser.parse_args(argv)
    paths = sorted(args.notebooks.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only))]
    if not paths:
        parser.error(f"no notebook in {args.notebooks} matches --only {' '.join(args.only or [])}: "
                     "give name prefixes such as 02 03")
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
