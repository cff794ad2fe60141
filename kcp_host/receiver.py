"""The backup host's side: its setup, and the etcd hosts' forced command, which only ever adds files.

Retention is applied here, so a compromised etcd host cannot erase history; everything the client sends
(request, name, size, content) is hostile until checked. Order and age come from this host's own clock:
every filed pair gets a receipt (`NAME.receipt`, a name no upload can have) with its arrival time and the
sha256 this host computed, and retention and the restore's default choice go by that. docs/backups.md.
"""

from __future__ import annotations

import argparse
import calendar
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

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
  fail       record one line from stdin as the cluster's last backup failure"""


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
        self.incoming, self.bad = root / ".incoming", root / "bad"
        self.pattern = re.compile(rf"{re.escape(root.name)}-([0-9]{{8}}T[0-9]{{6}}Z)\.(db|json)")

    def record(self, **changes: Any) -> None:
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
        with tempfile.NamedTemporaryFile(prefix=".partial.", dir=self.incoming) as out:
            size = 0
            while size <= limit and (chunk := source.read(min(1 << 20, limit + 1 - size))):
                size += out.write(chunk)
            if size > limit:
                raise Abort(1, f"{name} is larger than {limit} bytes")
            out.flush()
            os.fsync(out.fileno())
            os.chmod(out.name, 0o640)
            os.link(out.name, self.incoming / name)

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
        for path in self.incoming.iterdir():  # a .db whose .json never came (the client died in between) is no backup
            if path.is_file() and path.stat().st_mtime < time.time() - STALE_SECONDS:
                path.unlink()
        self.record(kept_recent=min(len(filed), self.recent), kept_daily=len(days))


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
    with flocked(args.root / ".lock", wait_seconds=60, what="etcd-backup-receive"):
        match command.split():
            case ["put", name]:
                store.receive(name, sys.stdin.buffer)
                if name.endswith(".json"):
                    store.file_pair(name.removesuffix(".json"))
            case ["fail"]:
                line = sys.stdin.buffer.read(4096).split(b"\n")[0].decode("utf-8", "replace")
                store.record(last_failure=utc_iso(), last_failure_reason=one_line(line, 4096))
            case _:
                raise Abort(1, f"refusing request {one_line(command, 200)!r}\n{REQUESTS}")
    return 0
