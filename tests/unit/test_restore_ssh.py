"""The operator tools' ssh (components/restore/ssh.py) leaves no control folder behind.

ssh's multiplexing master answers `-O exit` and removes its socket a moment later; a stand-in `ssh` does the
same here, so close() must wait for the socket before it can remove the folder (it used to leave one behind,
holding known_hosts, for about one in three runs of the tools in CI).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from components.restore.ssh import SOCKET_REMOVAL_SECONDS, Ssh

# `ssh ... -O exit`: the master ends (exit 0) and its socket, named in $STANDIN_SOCKET, goes 0.3 s later.
STANDIN_SSH = """#!/bin/sh
(sleep 0.3; rm -f "$STANDIN_SOCKET") >/dev/null 2>&1 &
exit 0
"""


@pytest.fixture
def ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ssh:
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
