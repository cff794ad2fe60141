"""The delta log in a restore: a snapshot plus the revisions archived after it, replayed on one member into one
point-in-time snapshot, which the restore then streams to every member like any other snapshot.

`Replayed` wraps a source that has a delta log (sources.DeltaLog: the backup host's folder, a bucket) and keeps the
Source protocol: `pick` chooses the base snapshot, the chain of chunks after it (kcp_host/deltalog.py's rules) and the
target revision (the newest archived one, or `--until`'s), has `kcp-host etcd-delta-replay` replay them on the
plan's first host and saves what it writes; `open` streams that file. Every refusal comes from `pick`, so the
restore's guard ends every member's session before any member was sent anything.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import takewhile
from pathlib import Path
from typing import IO, Any

from components.restore import RestoreError
from components.restore.members import Host
from components.restore.sources import DeltaLog, Fetch, utc_time
from components.restore.ssh import Ssh
from components.restore.stream import CHUNK, SnapshotStream, fan_out
from kcp_host import deltalog
from kcp_host.contract import AGENT
from kcp_host.files import widen_pipe

Until = int | datetime  # --until: a revision, or a time (aware, UTC)
Chosen = tuple[dict[str, Any], list[dict[str, Any]]]  # the base snapshot's metadata, the delta log's chunks
# The point-in-time snapshot's name: <base>_deltas-<revision>. Not `+`: a member takes a snapshot name of
# [A-Za-z0-9_.-] only (kcp_host/restore_member.py's SAFE_WORD: the name also names its staged file).
NAME_JOIN = "_deltas-"
CHAIN_FILE, REPLAYED_FILE = "chain.deltas", "replayed.db"  # in the scratch dir
LOG_LINES = 5  # the replaying member's last stderr lines, quoted when it fails
# The replay starts a throwaway etcd, applies one transaction per revision and saves a snapshot: bounded, so a
# host that hangs does not hold every member's session forever, and generous for a long chain.
REPLAY_BASE_SECONDS = 600
REPLAY_BYTES_PER_SECOND = 2e6


def until_argument(text: str) -> Until:
    """--until: a revision (digits) or an ISO 8601 time with its zone (2026-12-01T06:30:00Z). A time without
    one would be read in the operator's own zone, so it is refused."""
    if deltalog.REVISION_TEXT.fullmatch(text):
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a revision nor an ISO 8601 time like "
                                         "2026-12-01T06:30:00Z") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"'{text}' has no zone: give the time in UTC, like 2026-12-01T06:30:00Z")
    return when.astimezone(UTC)


def shown(until: Until) -> str:
    return f"revision {until}" if isinstance(until, int) else iso(until.timestamp())


def iso(epoch: float) -> str:
    """UTC with milliseconds: an archived revision's `at` has them, and an RPO is measured from it."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def taken(meta: dict[str, Any]) -> datetime | None:
    """A snapshot's `taken_at` (UTC when it names no zone), None when it has none that parses."""
    return utc_time(meta.get("taken_at"))


def fits(meta: dict[str, Any], until: Until) -> bool:
    """Whether a snapshot can start a restore to `until`: at or before its revision, or taken at or before its time."""
    if isinstance(until, int):
        return isinstance(meta.get("revision"), int) and meta["revision"] <= until
    when = taken(meta)
    return when is not None and when <= until


def data_of(stream: SnapshotStream) -> Iterator[bytes]:
    """The snapshot's bytes without the verdict line SnapshotStream ends with: the replay reads a counted stream;
    `stream.refusal` says afterwards whether count and sha256 were the recorded ones."""
    pieces = iter(stream)
    held = next(pieces)
    for piece in pieces:
        yield held
        held = piece


def save(stream: IO[bytes], path: Path) -> tuple[str, int]:
    """The replay's output into a new private file, hashed as it arrives: its sha256 and size."""
    digest, size = hashlib.sha256(), 0
    with stream, open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        while block := stream.read(CHUNK):
            digest.update(block)
            size += out.write(block)
    return digest.hexdigest(), size


def tail(stream: IO[bytes], lines: deque[str]) -> None:
    """What the replaying member logs, its last lines kept: the last one is its result, or why it failed."""
    with stream:
        for line in stream:
            lines.append(line.decode(errors="replace").rstrip())


def result_of(returncode: int, lines: Iterable[str], host: Host) -> dict[str, Any]:
    """The member's `result {json}` line, the last it logged, or RestoreError quoting its last lines."""
    said = list(lines)
    if returncode == 0 and said and said[-1].startswith("result "):
        with contextlib.suppress(ValueError):
            result = json.loads(said[-1].removeprefix("result "))
            if isinstance(result, dict) and all(type(result.get(k)) is int for k in ("revision", "keys", "hashkv",
                                                                                      "replayed")):
                return result
    raise RestoreError(f"the replay on {host.name} failed (exit {returncode}): "
                       f"{' / '.join(said[-LOG_LINES:]) or 'it logged nothing'}")


def step_line(meta: dict[str, Any]) -> str | None:
    """What the restore prints once the snapshot is picked: the replay (or why there was none); None without a
    delta log."""
    deltas = meta.get("deltas")
    if not deltas:
        return None
    if not deltas["revisions"]:
        return str(deltas["note"])
    checked = "replayed and checked" if deltas.get("checked_revision") is not None else \
        "replayed (no chunk carried a check)"
    line = (f"restored to revision {meta['revision']} (as of {deltas['last_at']}): snapshot {meta['base']['name']} "
            f"+ {deltas['revisions']} revisions from {deltas['chunks']} chunks, {checked} on {deltas['host']} in "
            f"{deltas['replay_seconds']:.1f} s")
    return f"{line}; {deltas['note']}" if deltas.get("note") else line


@dataclass
class Gathered:
    """The chunks a restore replays, written in order, and where they take it."""

    chunks: list[dict[str, Any]]
    target: int  # the revision restored
    last_at: float | None  # its `at`; None: no revision to replay
    reach: int  # how far the chain must hold: past the target where a gap ended the gathering
    cut: bool  # a revision after the deadline is archived: the time falls inside the chain


@dataclass
class Replayed:
    """A source with a delta log, restored to its newest archived revision or to `until` (see the module)."""

    source: DeltaLog
    ssh: Ssh
    host: Host  # replays: one member, over the plan's ssh
    until: Until | None = None
    scratch: Path | None = field(default=None, init=False)

    def where(self) -> str:
        return f"{self.source.where()} with its delta log (replayed on {self.host.name})"

    def pick(self, wanted: str | None, chosen: Chosen | None = None) -> dict[str, Any]:
        """The point-in-time snapshot's metadata, replayed and saved; the base snapshot's own when nothing is to
        be replayed. `chosen`: what choose() found already. Every refusal says that nothing was changed: no member
        was sent anything yet."""
        try:
            return self.replayed(*(chosen or self.choose(wanted)))
        except RestoreError as error:
            raise RestoreError(f"{error}; nothing was changed") from None

    def choose(self, wanted: str | None) -> Chosen:
        """The base snapshot and the delta log's listing: reads only, so the restore asks it while the members say
        whether they see a healthy quorum; the replay waits for their answers."""
        base = self.base(wanted)
        return base, self.source.deltas(base)

    def open(self, meta: dict[str, Any]) -> Fetch:
        if "replayed_file" in meta:
            return Fetch(Path(meta["replayed_file"]).open("rb"))
        return self.source.open(meta)

    def close(self) -> None:
        """Delete the replayed snapshot and the chunks: they hold every secret of the cluster."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self.source.close()

    def base(self, wanted: str | None) -> dict[str, Any]:
        """pick_backup's choice (newest verified arrival, or the named one), among the snapshots at or before
        `until` when there is one."""
        until = self.until
        if wanted:
            meta = self.source.pick(wanted)
            if until is not None and not fits(meta, until):
                raise RestoreError(f"--until {shown(until)} is before {wanted} (revision {meta.get('revision')}, "
                                   f"taken {meta.get('taken_at')}): name an older snapshot, or leave --snapshot out")
            return meta
        if until is None:
            return self.source.pick(None)
        try:
            return self.source.pick(None, keep=lambda meta: fits(meta, until))
        except RestoreError as error:
            raise RestoreError(f"no snapshot to start from at or before {shown(until)} ({error})") from None

    def replayed(self, base: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
        """The chain after `base` gathered up to the target (refused where it breaks before), replayed, checked."""
        after, until = int(base["revision"]), self.until
        # To a time, how far the chain must hold is known once its chunks are read: a gap after the time is no matter.
        if isinstance(until, datetime):
            got = self.gather(sorted((c for c in log if not c.get("refused") and c["last"] > after),
                                     key=lambda c: (c["first"], c["last"])), after, until.timestamp())
            chained(base, log, got.reach)  # refuses an overlap, or a gap before the time, in deltalog's words
        else:
            got = self.gather(chained(base, log, until), after, None)
        if got.last_at is None:
            return self.alone(base, "no archived revision after it" +
                              (f" up to {shown(until)}" if until is not None else ""))
        note = None
        if isinstance(until, datetime) and not got.cut:
            note = (f"{shown(until)} is after the newest archived revision ({got.target}, at {iso(got.last_at)}): "
                    "restored up to that one")
        return self.point_in_time(base, got, got.last_at, note)

    def point_in_time(self, base: dict[str, Any], got: Gathered, last_at: float, note: str | None) -> dict[str, Any]:
        """The replay of what was gathered, refused unless it reached the target revision by replaying each
        revision once; the metadata of the snapshot it wrote."""
        assert self.scratch
        after, target, started = int(base["revision"]), got.target, time.monotonic()
        result, digest, size = self.replay(base, self.scratch / CHAIN_FILE, target)
        if (result["revision"], result["replayed"]) != (target, target - after) or size <= 0:
            raise RestoreError(f"the replay on {self.host.name} reached revision {result['revision']} with "
                               f"{result['replayed']} revisions replayed and {size} bytes saved, not revision "
                               f"{target} with {target - after}")
        deltas = {"chunks": len(got.chunks), "revisions": result["replayed"], "first_revision": after + 1,
                  "last_revision": target, "last_at": iso(last_at),
                  "replay_seconds": round(time.monotonic() - started, 3),
                  "checked_revision": result.get("checked_revision"), "host": self.host.name, "note": note}
        return {"name": f"{base['name']}{NAME_JOIN}{target}", "cluster": base.get("cluster"),
                "revision": result["revision"], "keys": result["keys"], "hashkv": result["hashkv"],
                "sha256": digest, "file_bytes": size, "verified": True, "taken_at": iso(last_at),
                "arrived": base.get("arrived"), "base": base, "deltas": deltas,
                "replayed_file": str(self.scratch / REPLAYED_FILE)}

    def gather(self, chunks: list[dict[str, Any]], after: int, deadline: float | None) -> Gathered:
        """Fetch and decode the chunks in order and write the ones the target needs, into the scratch dir (made
        here, 0700): with a deadline, up to the last revision before the first one archived after it."""
        self.scratch = Path(tempfile.mkdtemp(prefix="kcp-restore-deltas-"))
        got = Gathered([], after, None, after, cut=False)
        with open(os.open(self.scratch / CHAIN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out, \
                contextlib.closing(self.source.fetch_deltas(chunks)) as fetched:
            for entry, data in zip(chunks, fetched, strict=False):
                rows = list(deltalog.revisions([decoded(entry, data)], after=got.target,
                                               until=self.until if isinstance(self.until, int) else None))
                if rows and rows[0].rev != got.target + 1:  # a gap: chained(reach) says where
                    got.reach = rows[0].rev
                    break
                kept = list(takewhile(lambda row: deadline is None or row.at <= deadline, rows))
                if kept:
                    out.write(data)
                    got.chunks.append(entry)
                    got.target = got.reach = kept[-1].rev
                    got.last_at = kept[-1].at
                if len(kept) < len(rows):  # the time falls in this chunk
                    got.cut = True
                    break
        return got

    def replay(self, base: dict[str, Any], chain: Path, target: int) -> tuple[dict[str, Any], str, int]:
        """`kcp-host etcd-delta-replay` on the host: stdin the base snapshot (its count and sha256 checked as it
        passes, like every member's stream) then the chunks; stdout the point-in-time snapshot, saved here."""
        assert self.scratch
        chain_bytes = chain.stat().st_size
        command = shlex.join([AGENT, "etcd-delta-replay", str(int(base["file_bytes"])), str(chain_bytes),
                              "--until", str(target)])
        timeout = REPLAY_BASE_SECONDS + (int(base["file_bytes"]) + chain_bytes) / REPLAY_BYTES_PER_SECOND
        proc = self.ssh.popen(self.host.address, command, stdin=subprocess.PIPE)
        assert proc.stdin and proc.stdout and proc.stderr
        widen_pipe(proc.stdin)
        lines: deque[str] = deque(maxlen=LOG_LINES)
        with ThreadPoolExecutor(max_workers=2) as pool:
            saved = pool.submit(save, proc.stdout, self.scratch / REPLAYED_FILE)
            logged = pool.submit(tail, proc.stderr, lines)
            try:
                fetch = self.source.open(base)
                with fetch.stream:
                    fan_out(self.feed(base, fetch, chain), {self.host.name: proc.stdin})
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise RestoreError(f"the replay on {self.host.name} took longer than {timeout:.0f} s") from None
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            digest, size = saved.result()
            logged.result()
        return result_of(proc.returncode, lines, self.host), digest, size

    def feed(self, base: dict[str, Any], fetch: Fetch, chain: Path) -> Iterator[bytes]:
        """The replay's stdin; a base snapshot that is not the recorded one stops it before any chunk."""
        stream = SnapshotStream(fetch.stream, base)
        yield from data_of(stream)
        if why := fetch.failure(stream.count) or stream.refusal:
            raise RestoreError(f"REFUSED the base snapshot {base['name']}: {why}")
        with chain.open("rb") as chunks:
            while block := chunks.read(CHUNK):
                yield block

    def alone(self, base: dict[str, Any], why: str) -> dict[str, Any]:
        """The base snapshot restored as it is, and why."""
        return {**base, "base": base, "deltas": {
            "chunks": 0, "revisions": 0, "first_revision": None, "last_revision": int(base["revision"]),
            "last_at": None, "replay_seconds": 0.0, "checked_revision": None, "host": None,
            "note": f"restoring {base['name']} alone: {why}"}}


def chained(base: dict[str, Any], log: list[dict[str, Any]], until: int | None) -> list[dict[str, Any]]:
    """The chunks of the delta log that carry `base` on to `until` (None: as far as they go), in order, by
    deltalog.chain; where they cannot, RestoreError with its words, the chunks left out, and what to do."""
    after = int(base["revision"])
    usable = {(c["first"], c["last"]): c for c in log if not c.get("refused")}
    try:
        return [usable[link] for link in deltalog.chain(usable, after, until)]
    except deltalog.DeltaError as error:
        left_out = [f"{c['name']} ({c['refused']})" for c in log if c.get("refused") and c["last"] > after]
        raise RestoreError(f"the delta log cannot carry {base['name']} (revision {after}) on: {error}"
                           f"{'; left out: ' + ', '.join(left_out) if left_out else ''}. Restore to an earlier "
                           "revision with --until REVISION, or the snapshot alone with --no-deltas") from None


def decoded(entry: dict[str, Any], data: bytes) -> deltalog.Chunk:
    """A fetched chunk, every rule of its format checked, holding the range its name (and receipt) says."""
    try:
        chunk = deltalog.decode(data)
    except deltalog.DeltaError as error:
        raise RestoreError(f"delta chunk {entry['name']}: {error}") from None
    if (chunk.first, chunk.last) != (entry["first"], entry["last"]):
        raise RestoreError(f"delta chunk {entry['name']}: its header says {chunk.first}..{chunk.last}")
    return chunk
