"""The benchmarks' command lines refuse a bad value at once, in one line, before any work (exit status 2)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import profiles

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

BAD = [
    ("grpo_mini.py", ["--dev", "-5"], "--dev"), ("grpo_mini.py", ["--dev", "0"], "--dev"),
    ("grpo_mini.py", ["--select", "-1"], "--select"), ("grpo_mini.py", ["--every", "0"], "--every"),
    ("grpo_mini.py", ["--temperature", "nan"], "--temperature"), ("grpo_mini.py", ["--lr", "-1"], "--lr"),
    ("grpo_mini.py", ["--steps", "-1"], "--steps"), ("grpo_mini.py", ["--seeds", "x"], "--seeds"),
    ("warm_start.py", ["--train", "0"], "--train"), ("warm_start.py", ["--batch", "0"], "--batch"),
    ("warm_start.py", ["--steps", "0"], "--steps"), ("warm_start.py", ["--max-minutes", "inf"], "--max-minutes"),
    ("retrieval.py", ["--sizes", "0"], "--sizes"), ("retrieval.py", ["--queries", "1.5"], "--queries"),
    ("lm_throughput.py", ["--rollouts", "3x"], "--rollouts"), ("lm_throughput.py", ["--claims", "-1"], "--claims"),
    ("lm_throughput.py", ["--beside-busy", "1.5"], "--beside-busy"),
    ("grpo_mini.py", ["--record", "--seeds", "0", "1", "2"], "--record"),
    ("grpo_mini.py", ["--record", "--warm-start", "--seeds", "0", "1", "2", "3", "--dev", "100", "--select", "24"], "--record"),
]


def _run(script, args, env=None):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("script, args, option", BAD)
def test_a_bad_value_is_refused_in_one_line_before_any_work(script, args, option):
    done, seconds = _run(script, args)
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: argument {option}: ") and "Traceback" not in done.stderr
    assert seconds < 30


@pytest.mark.slow  # each child process generates the mini world and loads dspy
@pytest.mark.parametrize("script, args, option", [("grpo_mini.py", ["--dev", "100000"], "--dev"),
                                                  ("grpo_mini.py", ["--select", "100000"], "--select"),
                                                  ("warm_start.py", ["--train", "100000"], "--train")])
def test_asking_for_more_claims_than_the_split_has_is_refused_before_the_index_or_the_lm(tmp_path, script, args, option):
    import os

    env = {**os.environ, profiles.CACHE_ENV: str(tmp_path)}
    done, _ = _run(script, args, env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: argument {option}: 100000 is more than the ")
    assert not (tmp_path / "mini" / "index").exists()  # refused before the index was built or the LM loaded
