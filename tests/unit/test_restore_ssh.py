"""The operator tools' ssh (components/restore/ssh.py) leaves no control folder behind.

CI used to find about ten folders holding only known_hosts after each run (from the tools), for two reasons
tested here. ssh's multiplexing master answers `-O exit` and removes its socket a moment later (a stand-in `ssh`
does the same), so close() must wait for the socket before it can remove the folder. And the tools reach their
hosts from several threads at once: all of them must share the one folder that close() removes.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from components.restore import ssh as ssh_module
from components.restore.ssh import SOCKET_REMOVAL_SECONDS, Ssh

# `ssh ... -O exit`: the master ends (exit 0) and its socket, named in $STANDIN_SOCKET, goes 0.3 s later.
STANDIN_SSH = """#!/bin/sh
(sleep 0.3; rm -f "$STANDIN_SOCKET") >/dev/null 2>&1 &
exit 0
"""


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the control folders are made for these tests (instead of the machine's temporary folder)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def ssh(tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Ssh:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(STANDIN_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return Ssh(user="root", key=None, host_keys={"10.0.0.1": "ssh-ed25519 AAAAC3Nz"})


def start_master(ssh: Ssh, name: str, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """A socket in the control folder, as a master leaves it; the stand-in removes it when told to exit."""
    socket = Path(ssh.control_dir) / name
    socket.touch()
    if monkeypatch is not None:
        monkeypatch.setenv("STANDIN_SOCKET", str(socket))
    return socket


def test_the_control_folder_goes_once_the_ended_master_removes_its_socket(ssh: Ssh,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(ssh.control_dir)
    start_master(ssh, "h1", monkeypatch)
    ssh.close(["10.0.0.1"])
    assert not folder.exists(), f"left behind: {sorted(p.name for p in folder.iterdir())}"


def test_a_master_still_running_keeps_the_folder_and_close_does_not_wait_for_it(
        ssh: Ssh, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(ssh.control_dir)
    ended = start_master(ssh, "h1", monkeypatch)
    running = start_master(ssh, "h2")
    started = time.monotonic()
    ssh.close(["10.0.0.1"])
    waited = time.monotonic() - started
    assert not ended.exists() and running.exists() and (folder / "known_hosts").exists()
    assert waited < SOCKET_REMOVAL_SECONDS, f"close waited {waited:.2f} s for a master it did not end"


def test_threads_that_reach_hosts_at_once_share_one_control_folder(ssh: Ssh, scratch: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder = tempfile.mkdtemp

    def slow_mkdtemp(prefix: str) -> str:  # widens the window in which a second thread could make its own
        time.sleep(0.05)
        return make_folder(prefix=prefix)

    monkeypatch.setattr(ssh_module.tempfile, "mkdtemp", slow_mkdtemp)
    start = threading.Barrier(4)
    seen: list[str] = []

    def reach_host() -> None:
        start.wait()
        seen.extend(option for option in ssh.argv("10.0.0.1") if option.startswith("ControlPath="))

    threads = [threading.Thread(target=reach_host) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and len(list(scratch.iterdir())) == 1, sorted(p.name for p in scratch.iterdir())
    ssh.close(["10.0.0.1"])
    assert not list(scratch.iterdir()), "the one folder goes with close()"
