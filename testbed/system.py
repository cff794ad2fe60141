"""Small process helpers shared by the test-bed modules.

Everything here shells out to ordinary tools (ip, systemd-nspawn, ssh) because
the test bed must run with the standard library only, on CI and by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: PATH for every child process: the sbin directories are missing from some
#: shells' PATH, and ip/debootstrap/chroot live there.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays machine-readable."""
    print(f"[sandbox] {message}", file=sys.stderr, flush=True)


def run(
    argv: list[str],
    *,
    check: bool = True,
    input: bytes | None = None,
    timeout: float | None = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv, capture its output, and raise with stderr attached on failure.

    A bare CalledProcessError hides stderr; tests that fail during setup are
    much easier to read when the tool's own message is in the exception.
    """
    full_env = {**os.environ, "PATH": SYSTEM_PATH, **(env or {})}
    proc = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc


def keygen(path: Path, comment: str) -> None:
    """A new passphrase-less ed25519 key pair at path (and path.pub)."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its start time, so that a recycled pid is never mistaken for ours."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """Identity of a live process, or None when it is gone (or a zombie)."""
        stat = read_stat(pid)
        if stat is None or stat[0] == "Z":
            return None
        return cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """True while this exact process (same pid AND same start time) runs."""
        return ProcessId.of(self.pid) == self


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Child pids of pid; this kernel has no /proc/PID/task/TID/children file."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is not None and int(stat[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll predicate() until it is true; bounded in time and in number of tries."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def held_alone(path: Path, patience: float) -> Iterator[None]:
    """Hold the lock file at path for the block; another holder makes this wait, saying which pid it waits for,
    and fail after `patience` seconds, naming it: a holder that hangs must not hang every later run with it.

    The pid is written into the file only as information: the kernel releases the flock when its holder dies,
    so a crashed holder never leaves it taken.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        deadline = time.monotonic() + patience
        waited_for: str | None = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                if holder != waited_for:
                    log(f"waiting for pid {holder}, which holds {path}")
                    waited_for = holder
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"pid {holder} still holds {path} after {patience:.0f} s of waiting: "
                                       "if it hangs, stop it; the lock is freed when it exits") from None
                time.sleep(0.5)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
