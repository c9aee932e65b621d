"""Sharing the machine: the engine's worker uses one thread per core other processes leave free."""

import os
import subprocess
import sys
import time

import pytest

from helpers.engine import threads


def write_stat(path, busy, idle=1000):
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\n")


def test_others_load_from_proc_stat(tmp_path, monkeypatch):
    """Others' load is all busy time less this process's own, per second: here 2 cores' worth of ticks, 1 of them ours."""
    stat, clock = tmp_path / "stat", [100.0]
    own = [10.0]
    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads.os, "times", lambda: os.times_result((own[0], 0.0, 0.0, 0.0, 0.0)))
    write_stat(stat, busy=0)
    share = threads.FairShare(2, every=0.5, stat_path=str(stat))
    clock[0] += 1.0
    own[0] += 1.0
    write_stat(stat, busy=2 * tick)
    assert share.update() == 1 and share.others == pytest.approx(1.0)
    clock[0] += 0.2  # too soon to read again: the last answer stands
    write_stat(stat, busy=2 * tick + 5)
    assert share.update() == 1
    clock[0] += 1.0
    own[0] += 1.0
    write_stat(stat, busy=3 * tick + 5)  # only our own second: alone again
    assert share.update() == 2 and share.others == pytest.approx(0.05 / 1.2)
    clock[0] += 1.0
    write_stat(stat, busy=3 * tick + 5 + int(0.3 * tick))  # a light neighbour (0.3 core) takes no thread
    assert share.update() == 2


def test_no_proc_stat_means_every_core(tmp_path):
    share = threads.FairShare(4, stat_path=str(tmp_path / "missing"))
    assert share.update() == 4
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert threads.FairShare(4, stat_path=str(tmp_path / "odd")).update() == 4


def expected_threads(cores, others):
    return max(1, min(cores, cores - int(others + 0.5)))


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_a_real_busy_process_takes_a_thread():
    """A real process spinning on one core adds about one core to others' load and takes a thread (at least one
    stays); killed, the load falls back. Relative to what else runs on the machine meanwhile."""
    cores = os.cpu_count()
    share = threads.FairShare(cores, every=0.3)
    time.sleep(1.0)
    share.update()
    quiet = share.others
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        share.update()  # the interval that saw the start
        time.sleep(1.5)
        assert share.update() == expected_threads(cores, share.others) < cores
        loaded = share.others
        assert loaded > quiet + 0.6, (quiet, loaded)
    finally:
        busy.kill()
        busy.wait()
    share.update()  # the interval that saw the kill
    time.sleep(1.0)
    assert share.update() == expected_threads(cores, share.others)
    assert share.others < loaded - 0.6, (loaded, share.others)
