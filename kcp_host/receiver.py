"""The backup host's side: its setup, and the etcd hosts' forced command, which only ever adds files.

Retention is applied here, so a compromised etcd host cannot erase history; everything the client sends
(request, name, size, content) is hostile until checked. Order and age come from this host's own clock:
every filed pair gets a receipt (`NAME.receipt`, a name no upload can have) with its arrival time and the
sha256 this host computed, and retention and the restore's default choice go by that. The delta log's chunks
(deltas/) are taken only as the next link of a chain that starts right after a kept snapshot. docs/backups.md.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kcp_host import deltalog, files
from kcp_host.files import flocked, one_line, read_json, sha256_of, update_json, utc_iso, write_atomic, write_json
from kcp_host.log import Abort

KEEP_BAD = 3
META_MAX_BYTES = 1 << 20  # a snapshot's metadata is under 1 KB; a larger .json is not one
STALE_SECONDS = 86400
AHEAD_SECONDS = 300  # a name stamped further ahead of this host's clock is refused
REQUESTS = """requests, read from SSH_ORIGINAL_COMMAND:
  put NAME   store stdin as DIR/NAME (NAME = <cluster>-<YYYYmmddTHHMMSSZ>.db|.json, new only, stamped
             at most 5 minutes ahead of this host's clock); a .json (sent after its .db) files the pair:
             checked, given its receipt (arrival time, sha256), kept or marked bad, pruned
  fail       record one line from stdin as the cluster's last backup failure
  delta FIRST LAST
             store stdin, one delta log chunk of revisions FIRST..LAST (at most 8 MiB), as
             DIR/deltas/<FIRST>-<LAST>.delta with its receipt, if FIRST is the chain's next revision,
             or a kept snapshot's revision + 1 beyond it (a new segment)
  delta-next print {"next": the chain's next revision or null, "snapshot_revisions": [...]}"""
SHOWN_REVISIONS = 50


def setup(argv: list[str]) -> int:
    """A dedicated user that can only run the forced command of the authorized_keys line on stdin, owning DIR."""
    parser = argparse.ArgumentParser(prog="kcp-host backup-host-setup", description=setup.__doc__)
    parser.add_argument("user", metavar="USER")
    parser.add_argument("dir", metavar="DIR")
    args = parser.parse_args(argv)
    line = sys.stdin.read().strip()
    if not line.startswith("restrict,command=") or "\n" in line:
        raise Abort(1, "refusing an authorized_keys line without a forced command")
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/bash", args.user], check=True)
    ssh = Path(pwd.getpwnam(args.user).pw_dir) / ".ssh"
    for path, mode in ((Path(args.dir), 0o750), (ssh, 0o700)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        shutil.chown(path, args.user, args.user)
    write_atomic(ssh / "authorized_keys", line + "\n", 0o600, owner=(args.user, args.user))
    print(f"backup host ready: {args.user} writes only through its forced command into {args.dir}")
    return 0


class Store:
    """The cluster's folder on the backup host. Every request holds its lock."""

    def __init__(self, root: Path, recent: int, daily: int, max_bytes: int) -> None:
        self.root, self.recent, self.daily, self.max_bytes = root, recent, daily, max_bytes
        self.incoming, self.bad, self.deltas = root / ".incoming", root / "bad", root / "deltas"
        self.pattern = re.compile(rf"{re.escape(root.name)}-([0-9]{{8}}T[0-9]{{6}}Z)\.(db|json)")

    def delta_lock(self) -> contextlib.AbstractContextManager[None]:
        """The delta log's own lock: a chunk every few seconds must not wait for a snapshot's upload of minutes."""
        return flocked(self.root / ".deltas.lock", wait_seconds=60, what="delta log request")

    def record(self, **changes: Any) -> None:
        """Snapshots and chunks are filed under different locks; the status file has its own, held briefly."""
        with flocked(self.root / ".status.lock", wait_seconds=30, what="status.json update"):
            update_json(self.root / "status.json", 0o640, format=1, **changes)

    def receive(self, name: str, source: BinaryIO) -> None:
        """Linked in (which never replaces a file) only once complete and within the size bound."""
        match = self.pattern.fullmatch(name)
        try:
            ahead = calendar.timegm(time.strptime(match[1], "%Y%m%dT%H%M%SZ")) - time.time() if match else None
        except ValueError:  # no such date
            ahead = None
        if ahead is None:
            raise Abort(1, f"refusing file name {name!r}")
        if ahead > AHEAD_SECONDS:
            raise Abort(1, f"refusing {name}: stamped {ahead:.0f}s ahead of the backup host's clock (at most "
                           f"{AHEAD_SECONDS}s allowed); check the clocks of the etcd hosts and of the backup host")
        if any((where / name).exists() for where in (self.root, self.bad, self.incoming)):
            raise Abort(1, f"{name} exists already; files are never replaced")
        limit = min(self.max_bytes, META_MAX_BYTES) if name.endswith(".json") else self.max_bytes
        if name.endswith(".db"):  # at most one other upload waits for its .json: the disk use stays bounded
            for old in sorted(self.incoming.glob("*.db"), key=lambda p: p.stat().st_mtime)[:-1]:
                old.unlink()
        with self.upload(source, limit, name) as path:
            os.link(path, self.incoming / name)

    @contextlib.contextmanager
    def upload(self, source: BinaryIO, limit: int, what: str) -> Iterator[Path]:
        """stdin in a private file under .incoming, complete, within `limit` and on disk (fsynced) when yielded: the
        caller links it in where it belongs (a link never replaces a file); it is gone after the block."""
        with tempfile.NamedTemporaryFile(prefix=".partial.", dir=self.incoming) as out:
            if files.copy_stream(source, out, limit + 1) > limit:
                raise Abort(1, f"{what} is larger than {limit} bytes")
            out.flush()
            os.fsync(out.fileno())
            os.chmod(out.name, 0o640)
            yield Path(out.name)

    def file_pair(self, base: str) -> None:
        """Keep the pair if intact and not failed, else set it apart: bad/ is never restored from. Its receipt
        (written first: a pair is never filed without one) holds what this host saw, not what the client said."""
        db, meta_path = self.incoming / f"{base}.db", self.incoming / f"{base}.json"
        if not db.is_file():
            meta_path.unlink()
            raise Abort(1, f"{base}.json arrived without {base}.db")
        try:
            meta = read_json(meta_path)
        except RecursionError:  # hostile nesting, which the JSON parser does not survive
            meta = {}
        reason, digest, now = "", sha256_of(db), time.time()
        if digest != meta.get("sha256"):
            reason = "sha256 of the received file differs from the recorded one (damaged in transit)"
            write_json(meta_path, {**meta, "verified": False, "verify_error": reason}, 0o640)
        elif meta.get("name") != base:
            reason = one_line(f"its metadata names {meta.get('name')!r}, not {base}")
        elif meta.get("verified") is False:
            reason = one_line(f"failed verification on {meta.get('member')}: {meta.get('verify_error')}")
        folder = self.bad if reason else self.root
        write_json(folder / f"{base}.receipt", {"format": 1, "name": base, "arrived": round(now, 6),
                                                "arrived_at": utc_iso(now), "sha256": digest,
                                                "bytes": db.stat().st_size}, 0o640)
        for path in (db, meta_path):
            os.link(path, folder / path.name)
            path.unlink()
        if reason:
            self.record(last_failure=utc_iso(), last_failure_reason=f"{base}: {reason}")
        else:
            verified = {"last_verified": utc_iso()} if meta.get("verified") is True else {}
            self.record(last_snapshot=base, last_success=utc_iso(), **verified)
        self.prune()
        if reason:
            raise Abort(1, f"{base} stored as bad: {reason}")

    def filed(self, folder: Path) -> list[tuple[float, str]]:
        """(arrival, name) of the pairs in `folder`, newest arrival first. A pair filed before receipts existed
        arrived when its .json was written (also this host's clock: the client cannot set it)."""
        pairs = [p for p in folder.glob("*.json") if self.pattern.fullmatch(p.name)]
        return sorted(((float(read_json(p.with_suffix(".receipt")).get("arrived") or p.stat().st_mtime), p.stem)
                       for p in pairs), reverse=True)

    def prune(self) -> None:
        """Retention by arrival on this host's clock, never by the names a client chose (docs/backups.md)."""
        filed = self.filed(self.root)
        first_of_day = {time.strftime("%Y%m%d", time.gmtime(at)): name for at, name in filed}  # its last = first
        days = list(first_of_day)[:self.daily]
        kept = {name for _, name in filed[:self.recent]} | {first_of_day[day] for day in days}
        doomed = [self.root / n for _, n in filed if n not in kept]
        for stem in doomed + [self.bad / n for _, n in self.filed(self.bad)[KEEP_BAD:]]:
            for suffix in (".db", ".json", ".receipt"):
                Path(f"{stem}{suffix}").unlink(missing_ok=True)
        self.prune_deltas()
        for path in self.incoming.iterdir():  # a .db whose .json never came (the client died in between) is no backup
            if path.is_file() and path.stat().st_mtime < time.time() - STALE_SECONDS:
                path.unlink()
        self.record(kept_recent=min(len(filed), self.recent), kept_daily=len(days))

    def snapshot_revisions(self) -> list[int]:
        """The revisions of the kept snapshots, ascending: a chain of chunks can start only right after one (a
        restore replays chunks onto a snapshot). The uploader's word, like the rest of the metadata."""
        revisions: set[int] = set()
        for path in self.root.glob("*.json"):
            if self.pattern.fullmatch(path.name):
                try:
                    revision = read_json(path).get("revision")
                except RecursionError:  # hostile nesting
                    continue
                if isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0:
                    revisions.add(revision)
        return sorted(revisions)

    def chunks(self) -> list[tuple[int, int, Path]]:
        """(first, last, path) of the stored chunks and their receipts. Their names were made here from checked
        headers, so the name says the range; a chunk whose receipt is missing counts all the same."""
        found = (deltalog.CHUNK_FILE.fullmatch(p.name) for p in self.deltas.iterdir()) if self.deltas.is_dir() else ()
        return sorted((int(m[1]), int(m[2]), self.deltas / m[0]) for m in found if m)

    def next_revision(self) -> int | None:
        """The revision the next chunk must start at: one past the newest stored; None before the first chunk."""
        lasts = [last for _, last, path in self.chunks() if path.suffix == ".delta"]
        return max(lasts) + 1 if lasts else None

    def check_link(self, first: int) -> None:
        """Chunks only ever extend the chain, or start a new segment right after a kept snapshot beyond it: a
        chunk cannot repeat or replace revisions, and no restore would replay across a gap."""
        after, snapshots = self.next_revision(), self.snapshot_revisions()
        if first == after or (first - 1 in snapshots and (after is None or first > after)):
            return
        if after is not None and first < after:
            raise Abort(1, f"overlap: revisions {first}..{after - 1} are archived already (next is {after})")
        if after is not None:
            raise Abort(1, f"gap: revisions {after}..{first - 1} would be missing (next is {after}; a new segment "
                           "starts only right after a kept snapshot's revision)")
        shown = ", ".join(map(str, snapshots[-5:])) or "none"
        raise Abort(1, f"no chunk is archived yet and {first - 1} is no kept snapshot's revision: the chain starts "
                       f"at a kept snapshot's revision + 1 (newest kept snapshot revisions: {shown})")

    def receive_delta(self, first: int, last: int, source: BinaryIO) -> None:
        """Checked whole before it is linked in; like a snapshot, its receipt (this host's clock and sha256) first."""
        what = f"chunk {first}..{last}"
        with self.upload(source, deltalog.MAX_CHUNK_BYTES, what) as path:
            try:
                chunk = deltalog.decode(path.read_bytes())
            except deltalog.DeltaError as error:
                raise Abort(1, f"refusing {what}: {one_line(str(error))}") from None
            if (chunk.first, chunk.last) != (first, last):
                raise Abort(1, f"refusing {what}: its header says {chunk.first}..{chunk.last}")
            if chunk.cluster != self.root.name:
                raise Abort(1, f"refusing {what}: it is of cluster {one_line(chunk.cluster, 80)!r}, this folder "
                               f"holds {self.root.name!r}")
            self.check_link(first)
            name, now = deltalog.chunk_name(first, last), time.time()
            self.deltas.mkdir(exist_ok=True)
            write_json(self.deltas / f"{name.removesuffix('.delta')}.receipt",
                       {"format": 1, "name": name, "first": first, "last": last, "arrived": round(now, 6),
                        "arrived_at": utc_iso(now), "sha256": sha256_of(path), "bytes": path.stat().st_size}, 0o640)
            os.link(path, self.deltas / name)
        self.record(last_delta_revision=last, last_delta_at=utc_iso(now), last_delta_chunk=name)

    def prune_deltas(self) -> None:
        """Chunks ending at or before the oldest kept snapshot's revision: no restore can replay them. None
        goes while no kept snapshot says its revision."""
        revisions = self.snapshot_revisions()
        if not revisions:
            return
        with self.delta_lock():
            for _, last, path in self.chunks():
                if last <= revisions[0]:
                    path.unlink()


def revision_argument(word: str) -> int:
    """The request line is hostile too: a revision is plain ASCII digits, bounded, as chunk names are."""
    if not deltalog.REVISION_TEXT.fullmatch(word):
        raise Abort(1, f"refusing delta revision {one_line(word, 40)!r}: FIRST and LAST are 1 to 19 decimal digits")
    return int(word)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-backup-receive", epilog=REQUESTS,
                                     description="the backup host's forced command: add files, never replace",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, metavar="DIR", help="the cluster's folder")
    parser.add_argument("--retain-recent", type=int, required=True, metavar="N")
    parser.add_argument("--retain-daily", type=int, required=True, metavar="N")
    parser.add_argument("--max-bytes", type=int, default=16 << 30, metavar="N", help="per .db (default: 16 GiB)")
    args = parser.parse_args(argv)
    os.umask(0o027)
    store = Store(args.root, args.retain_recent, args.retain_daily, args.max_bytes)
    for folder in (store.incoming, store.bad):
        folder.mkdir(parents=True, exist_ok=True)
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    delta = command.startswith("delta")
    with store.delta_lock() if delta else flocked(args.root / ".lock", wait_seconds=60, what="etcd-backup-receive"):
        match command.split():
            case ["put", name]:
                store.receive(name, sys.stdin.buffer)
                if name.endswith(".json"):
                    store.file_pair(name.removesuffix(".json"))
            case ["delta", first, last]:
                store.receive_delta(revision_argument(first), revision_argument(last), sys.stdin.buffer)
            case ["delta-next"]:
                revisions = store.snapshot_revisions()[-SHOWN_REVISIONS:]
                print(json.dumps({"next": store.next_revision(), "snapshot_revisions": revisions}))
            case ["fail"]:
                line = sys.stdin.buffer.read(4096).split(b"\n")[0].decode("utf-8", "replace")
                store.record(last_failure=utc_iso(), last_failure_reason=one_line(line, 4096))
            case _:
                raise Abort(1, f"refusing request {one_line(command, 200)!r}\n{REQUESTS}")
    return 0
