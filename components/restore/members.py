"""`kcp-host etcd-restore-member` steps on the members, over SSH: on one member, or on all at once.

A member's stdout is the step's answer; its stderr carries what it logged, each line prefixed
with its member name, so the last line says why a step failed.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def start(ssh: Ssh, host: Host, steps: Sequence[Sequence[str]],
          stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start steps on a member in one SSH round trip; finish() collects them."""
    return ssh.popen(host.address, agent_command(steps), stdin=stdin)


def finish(proc: subprocess.Popen[bytes], steps: Sequence[Sequence[str]], timeout: float = 300,
           note: Note | None = None) -> str:
    """The steps' stdout, or RestoreError naming them with the last line they logged.

    With `note`, what the member logged (its own timings) is shown under the running step.
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
    """Steps on one member, start to finish."""
    return finish(start(ssh, host, steps), steps, timeout, note)


def parallel(hosts: Sequence[Host], action: Callable[[Host], str]) -> dict[str, str]:
    """Run one step on every member at once; raise if any failed, naming each failure."""
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {h.name: pool.submit(action, h) for h in hosts}
    failures, results = [], {}
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except RestoreError as exc:
            failures.append(f"{name}: {exc}")
    if failures:
        raise RestoreError("; ".join(failures))
    return results


def first_line(proc: subprocess.Popen[bytes]) -> str:
    """The first line a member's `prepare` prints: what it sees of the cluster's quorum."""
    assert proc.stdout
    return proc.stdout.readline().decode(errors="replace").strip()


def collect(members: dict[str, subprocess.Popen[bytes]],
            note: Note) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Each member's end of `prepare`, once its stdin was closed: (failures, timings)."""
    failures, timings = [], {}
    for name, proc in members.items():
        proc.stdin = None  # closed by fan_out; communicate() must not flush it
        out, err = proc.communicate(timeout=600)
        lines = err.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0:
            line = lines[-1] if lines else f"exit {proc.returncode}"
            failures.append(line if line.startswith(f"{name}: ") else f"{name}: {line}")
            continue
        note(lines[-1] if lines else f"{name}: {out.decode().strip()}")
        words = out.decode().split()
        if len(words) == 4 and words[0] == "prepared":
            timings[name] = {"bytes": int(words[1]), "receive_seconds": float(words[2]),
                             "restore_seconds": float(words[3])}
    return failures, timings
