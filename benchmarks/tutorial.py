"""Whole tutorial, mini profile: minutes per notebook, executed headless into build/bench-notebooks.

Run: python benchmarks/tutorial.py [--only 01 02 03]
Uses the same runner as `make tutorial` (helpers.tools.run_notebooks) with an empty cache folder, so the times
are a new user's first run (world generation, model conversion, cold DSPy cache); committed notebooks are
not touched.
Prints each notebook's minutes, the total, and last the total as a share of CI's 90-minute limit.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_LIMIT_MIN = 90


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="notebook prefixes (quick mode: 01 02 03)")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "helpers.tools.run_notebooks", "--out", str(ROOT / "build" / "bench-notebooks")]
    if args.only:
        cmd += ["--only", *args.only]
    with tempfile.TemporaryDirectory(prefix="rlmh-bench-") as cache:
        env = {**os.environ, "RLMH_PROFILE": "mini", "RLMH_CACHE_DIR": cache}
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    minutes = (time.perf_counter() - start) / 60
    print(f"tutorial wall time {minutes:.1f} min = {minutes / CI_LIMIT_MIN:.2f} of CI's {CI_LIMIT_MIN}-minute limit")


if __name__ == "__main__":
    main()
