"""The lock that keeps two integration test runs on one machine from sharing test hosts (testbed.system.held_alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.system import held_alone
from tests.program import ROOT

# Another process (another test run) holding the lock: it says so, then holds it for the given seconds.
HOLDER = """
import sys, time
from pathlib import Path
from testbed.system import held_alone
with held_alone(Path(sys.argv[1]), patience=0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(lock: Path, seconds: float) -> subprocess.Popen[bytes]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], cwd=ROOT,
                              stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


def test_a_second_run_waits_for_the_first_and_says_for_which_pid(tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "state" / "integration-tests.lock"
    holder = hold(lock, 1.5)
    started = time.monotonic()
    with held_alone(lock, patience=30):
        waited = time.monotonic() - started
        assert lock.read_text() == f"{os.getpid()}\n"
    assert waited >= 1.0, f"did not wait: {waited:.2f}s"
    assert f"waiting for pid {holder.pid}, which holds {lock}" in capfd.readouterr().err


def test_a_killed_run_leaves_nothing_to_wait_for(tmp_path: Path) -> None:
    lock = tmp_path / "integration-tests.lock"
    holder = hold(lock, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with held_alone(lock, patience=30):
        assert time.monotonic() - started < 1.0


def test_a_run_behind_a_hung_one_gives_up_after_its_patience_and_names_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "integration-tests.lock"
    holder = hold(lock, 60)
    try:
        started = time.monotonic()
        with (pytest.raises(TimeoutError, match=f"pid {holder.pid} still holds {lock} after 2 s"),
              held_alone(lock, patience=2)):
            pytest.fail("took a lock another process holds")
        assert 2.0 <= time.monotonic() - started < 5.0
        assert holder.poll() is None, "the holder was disturbed"
    finally:
        holder.kill()
        holder.wait()
