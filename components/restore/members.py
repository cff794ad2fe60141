"""`kcp-host etcd-restore-member` on the members, over SSH: one session per member for the whole restore
(`Session`, `ask`), or one step on one host (`run`, for spares).

A member's stdout carries its answers, one line each; its stderr what it logged, each line prefixed
with its member name, so the last line says why it stopped.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as Late
from dataclasses import dataclass

from components.restore import RestoreError
from components.restore.ssh import Ssh
from kcp_host.contract import AGENT

Note = Callable[[str], None]  # prints a detail of the running step


@dataclass(frozen=True)
class Host:
    name: str
    address: str


def agent_command(steps: Sequence[Sequence[str]]) -> str:
    """The steps as one remote command, run one after the other, stopping at the first failure."""
    return " && ".join(shlex.join([AGENT, "etcd-restore-member", *step]) for step in steps)


class Session:
    """One member's `etcd-restore-member restore` over one SSH session: the operator's word goes to its stdin,
    its answers come back on stdout, a line each; what it logs is kept (the last line says why it stopped)."""

    def __init__(self, ssh: Ssh, host: Host, token: str, revision_bump: int) -> None:
        self.name = host.name
        self.proc = ssh.popen(host.address, agent_command([["restore", "--token", token, "--bump-revision",
                                                            str(revision_bump)]]), stdin=subprocess.PIPE)
        self.logged: list[str] = []
        self._shown = 0
        self._log_reader = threading.Thread(target=self._keep_log, daemon=True)
        self._log_reader.start()

    def _keep_log(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.logged.append(line.decode(errors="replace").rstrip())

    def say(self, line: str) -> None:
        """One line to the member; a member that stopped reading has said why (end() returns it)."""
        assert self.proc.stdin
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()

    def answer(self) -> list[str]:
        """The words of its next answer; none once it ended."""
        assert self.proc.stdout
        return self.proc.stdout.readline().decode(errors="replace").split()

    def news(self) -> list[str]:
        """What it logged since the last call."""
        lines, self._shown = self.logged[self._shown:], len(self.logged)
        return lines

    def end(self, timeout: float = 120) -> str | None:
        """Close its input (before `switch`, a member then removes what it prepared) and wait for its exit; why it
        failed (its last line, named), or None."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_reader.join(10)
        if self.proc.returncode == 0:
            return None
        line = self.logged[-1] if self.logged else f"exit {self.proc.returncode}"
        return line if line.startswith(f"{self.name}: ") else f"{self.name}: {line}"


def ask(sessions: dict[str, Session], line: str | None, timeout: float) -> dict[str, list[str]]:
    """Say `line` (if any) to every member, then wait for every member's answer, at most `timeout` seconds; a member
    that did not answer by then is killed (its answer: none)."""
    for session in sessions.values():
        if line is not None:
            session.say(line)
    pool = ThreadPoolExecutor(max_workers=len(sessions))
    futures = {name: pool.submit(session.answer) for name, session in sessions.items()}
    deadline, answers = time.monotonic() + timeout, {}
    for name, future in futures.items():
        try:
            answers[name] = future.result(max(0.0, deadline - time.monotonic()))
        except Late:
            sessions[name].proc.kill()
            answers[name] = []
    pool.shutdown(wait=False)
    return answers


def start(ssh: Ssh, host: Host, steps: Sequence[Sequence[str]],
          stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start steps on a host in one SSH round trip; finish() collects them."""
    return ssh.popen(host.address, agent_command(steps), stdin=stdin)


def finish(proc: subprocess.Popen[bytes], steps: Sequence[Sequence[str]], timeout: float = 300,
           note: Note | None = None) -> str:
    """The steps' stdout, or RestoreError naming them with the last line they logged.

    With `note`, what the host logged is shown under the running step.
    """
    out, err = proc.communicate(timeout=timeout)
    detail = err.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        detail = detail or out.decode(errors="replace").strip().splitlines()
        names = "+".join(step[0] for step in steps)
        raise RestoreError(f"{names} failed (exit {proc.returncode}): {detail[-1] if detail else ''}")
    for line in detail if note else ():
        note(line)
    return out.decode().strip()


def run(ssh: Ssh, host: Host, steps: Sequence[Sequence[str]], timeout: float = 300,
        note: Note | None = None) -> str:
    """Steps on one host, start to finish."""
    return finish(start(ssh, host, steps), steps, timeout, note)
