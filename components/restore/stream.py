"""The snapshot on its way to the members: read once, hashed once, written to every member at once.

What each member's `restore` session reads is a header (its answer: whether it has room), then, once every
member has room, the snapshot's bytes and a verdict line (kcp_host/restore_member.py is the other end).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import IO, Any

CHUNK = 1 << 20  # bytes per read of the snapshot stream
QUEUE_DEPTH = 16  # chunks a slow member may lag behind the fastest one


def header(meta: dict[str, Any]) -> str:
    """What a member reads first, and answers (`room`, or a refusal) before any byte is sent."""
    return f"snapshot {meta['name']} {int(meta['file_bytes'])}"


class SnapshotStream:
    """The snapshot's bytes, then `ok` or `refused REASON`.

    The bytes are hashed once, here, as they pass; the verdict line after them says whether
    their count and sha256 are the recorded ones. A member restores only after "ok", so a
    corrupt or truncated file is refused everywhere before anything live changes.
    """

    def __init__(self, source: IO[bytes], meta: dict[str, Any]) -> None:
        self.source = source
        self.meta = meta
        self.count = 0
        self.refusal: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        size = int(self.meta["file_bytes"])
        digest = hashlib.sha256()
        while chunk := self.source.read(CHUNK):
            self.count += len(chunk)
            digest.update(chunk)
            yield chunk
        got = digest.hexdigest()
        if self.count != size:
            self.refusal = f"{self.count} bytes arrived, the file had {size} when listed (truncated or replaced)"
        elif got != self.meta["sha256"]:
            self.refusal = f"sha256 of the {size} bytes is {got}, expected {self.meta['sha256']} (corrupt)"
        yield b"ok\n" if self.refusal is None else f"refused {self.refusal}\n".encode()


def fan_out(chunks: Iterable[bytes], sinks: dict[str, IO[bytes]], close: bool = True) -> None:
    """Copy `chunks` into every sink at once: one reader, one writer thread per sink; then every sink is closed
    (or, with close=False, flushed: the session goes on).

    Every chunk is read once and handed to all writers, so a member that reads slowly
    delays the others only by the queue's depth, not chunk by chunk. A sink that stops
    reading (its member refused or died) is dropped; its exit status tells why.
    """
    queues: dict[str, queue.Queue[bytes | None]] = {name: queue.Queue(maxsize=QUEUE_DEPTH) for name in sinks}

    def write(sink: IO[bytes], chunks: queue.Queue[bytes | None]) -> None:
        broken = False
        while (chunk := chunks.get()) is not None:
            if broken:
                continue
            try:
                sink.write(chunk)
            except (OSError, ValueError):  # a closed pipe: keep draining, or the reader would block
                broken = True
        with contextlib.suppress(OSError, ValueError):
            if close:
                sink.close()
            else:
                sink.flush()

    writers = [threading.Thread(target=write, args=(sinks[name], queues[name]), daemon=True) for name in sinks]
    for thread in writers:
        thread.start()
    try:
        for chunk in chunks:
            for pending in queues.values():
                pending.put(chunk)
    finally:
        for pending in queues.values():
            pending.put(None)
        for thread in writers:
            thread.join()
