"""Execute the numbered notebooks in order, headless: ``python -m helpers.tools.run_notebooks``.

Used by ``make tutorial`` (copies into build/, committed notebooks untouched), ``make notebooks`` (refreshes the
stored outputs in place) and ``make tutorial-arbor`` (``--arbor-cpu 06``: from 06 on, the notebooks talk to a CPU
Arbor server started here, as ``RLMH_LM=arbor``, and the server is stopped at the end). Prints each notebook's wall time.
"""

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
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


@contextlib.contextmanager
def arbor_cpu_server(log_path: Path, *options: str):
    """A CPU Arbor server (``python -m helpers.rl.arbor_cpu serve --port 0 [options]``) for the active profile;
    yields its URL once the model is loaded. Its log goes to ``log_path``; it is stopped when the block ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "helpers.rl.arbor_cpu", "serve", "--port", "0", *options],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            banner = server.stdout.readline()  # printed once the model is loaded and the port is bound
            found = re.search(r"on (http://127\.0\.0\.1:\d+/v1/)", banner)
            if not found:
                server.wait(30)
                raise RuntimeError(f"the CPU Arbor server did not start (exit {server.returncode}): see {log_path}")
            print(banner.strip(), flush=True)  # it names the server's limits (no GPUs, no vLLM)
            # anything it prints later goes to its log, so a full pipe never blocks it
            threading.Thread(target=lambda: [log.write(line) for line in server.stdout], daemon=True).start()
            yield found.group(1)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextlib.contextmanager
def environment(**values):
    """``os.environ`` with ``values`` set (kernels started inside inherit them), restored afterwards.

    (The names are ``helpers.profiles``' ``LM_ENV`` and ``ARBOR_URL_ENV``; this tool imports nothing from helpers.)"""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies")
    where.add_argument("--in-place", action="store_true", help="overwrite the committed notebooks")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 02 03")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="folder of the numbered notebooks")
    parser.add_argument("--arbor-cpu", metavar="PREFIX", default=None,
                        help="from the notebook with this prefix on (e.g. 06), RLMH_LM=arbor against a CPU Arbor server "
                             "started for them (its log: arbor-cpu.log beside the executed notebooks)")
    args = parser.parse_args(argv)
    paths = sorted(args.notebooks.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only))]
    if not paths:
        parser.error(f"no notebook in {args.notebooks} matches --only {' '.join(args.only or [])}: "
                     "give name prefixes such as 02 03")
    if args.arbor_cpu is not None and args.in_place:
        parser.error("--arbor-cpu runs into --out only: the committed notebooks keep the default LM's outputs")
    if args.arbor_cpu is not None and not any(p.name >= args.arbor_cpu for p in paths):
        parser.error(f"--arbor-cpu {args.arbor_cpu}: no notebook from there on among {[p.name for p in paths]}")
    before = [p for p in paths if args.arbor_cpu is None or p.name < args.arbor_cpu]
    total = _run_all(before, args)
    if total is not None and len(before) < len(paths):
        log_path = (args.out or args.notebooks) / "arbor-cpu.log"
        with arbor_cpu_server(log_path) as url, environment(RLMH_LM="arbor", RLMH_ARBOR_URL=url):
            more = _run_all(paths[len(before):], args, f" (RLMH_LM=arbor, server log {log_path})")
        total = None if more is None else total + more
    if total is None:
        return 1
    print(f"all notebooks: {total / 60:.1f} min")
    return 0


def _run_all(paths, args, note: str = "") -> float | None:
    """Run ``paths`` in order; their total seconds, or None (with the reason printed) at the first failure."""
    total = 0.0
    for path in paths:
        out = path if args.in_place else args.out / path.name
        try:
            seconds = run(path, out, args.timeout)
        except CellExecutionError as exc:
            print(f"{path.name}: FAILED — see {out}\n{str(exc).splitlines()[-1] if str(exc) else exc}", file=sys.stderr)
            return None
        total += seconds
        print(f"{path.name}: {seconds:6.1f} s{note}", flush=True)
    return total


if __name__ == "__main__":
    sys.exit(main())
