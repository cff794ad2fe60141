"""Files the agent writes: atomically (a crash leaves the old file or the new one), and locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from io import BufferedReader
from pathlib import Path
from typing import IO, Any, cast

from kcp_host.log import Abort

# A snapshot's pipe (the operator's ssh sessions, a host's stdin): fewer wake-ups than the 64 KiB default. Widened, a
# reader like a restoring member's took 1 GiB from the operator in 8.1 s instead of 9.7 s, one like the backup host's
# receiver in 2.66 s instead of 3.01 s (local test bed, medians of five).
PIPE_BYTES = 1 << 20
STREAM_BLOCK = 1 << 20  # bytes per read of a streamed file: it never sits in memory whole


def write_atomic(path: str | Path, content: str | bytes, mode: int = 0o644,
                 owner: tuple[str, str] | None = None) -> None:
    """`owner` (user, group by name) is set before the file appears: a key is never readable by the wrong one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content.encode() if isinstance(content, str) else content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            shutil.chown(tmp, *owner)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file; an absent or unreadable file is an empty object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: str | Path, value: dict[str, Any], mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n", mode)


def update_json(path: str | Path, mode: int = 0o644, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into a JSON object file (status.json); returns the new content."""
    value = {**read_json(path), **changes}
    write_json(path, value, mode)
    return value


@contextlib.contextmanager
def flocked(path: str | Path, wait_seconds: float = 0, what: str = "") -> Iterator[None]:
    """An exclusive lock on `path` for the block; Abort(1) when another process holds it longer."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Abort(1, f"another {what or 'run'} holds {path}") from None
                time.sleep(0.2)
        yield


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def one_line(text: str, limit: int = 300) -> str:
    """A reason for a status file or a journal line: printable characters only, bounded."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def chown_tree(path: str | Path, user: str) -> bool:
    """Give a tree to `user` and its primary group (etcd runs as its own user); False, changing nothing,
    where no such user exists."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return False
    os.chown(path, account.pw_uid, account.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    return True


def utc_stamp(epoch: float | None = None) -> str:
    """`20261130T194500Z`: sorts as time, safe in file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def utc_iso(epoch: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def widen_pipe(pipe: IO[bytes]) -> None:
    """Raise a pipe's buffer to PIPE_BYTES (Linux); a file, a socket or a refusal keeps what it has."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)


def copy_stream(source: IO[bytes], out: IO[bytes], limit: int) -> int:
    """At most `limit` bytes from a (widened) pipe into `out` through one reused buffer, which is faster than a new
    bytes object per read and than the `dd bs=1M` it replaced; returns the count, fewer when the stream ended first."""
    widen_pipe(source)
    readinto = cast(BufferedReader, source).readinto  # stdin's buffer has it, typing.IO does not say so
    buffer = memoryview(bytearray(STREAM_BLOCK))
    copied = 0
    while copied < limit and (got := readinto(buffer[:min(STREAM_BLOCK, limit - copied)])):
        copied += out.write(buffer[:got])
    return copied
