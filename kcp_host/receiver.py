"""The backup host's side: its setup, and the forced command that only ever adds files.

`etcd-backup-receive` is the forced command of the etcd hosts' key on the backup host
(authorized_keys: `restrict,command="kcp-host etcd-backup-receive --root DIR ..."`). Whatever the
client asks for, it can only add new files under DIR, the cluster's own folder: no reads, no
overwrites, no deletes. Retention is applied here, by the only party that sees every snapshot, so a
compromised etcd host cannot erase history. Everything the client sends (request, name, size,
content) is hostile until checked. Layout and retention rules: docs/backups.md.
"""

from __future__ import annotations

import argparse
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
CHUNK = 1 << 20
REQUESTS = """requests, read from SSH_ORIGINAL_COMMAND:
  put NAME   store stdin as DIR/NAME (NAME = <cluster>-<YYYYmmddTHHMMSSZ>.db|.json, new only);
             a .json (sent after its .db) files the pair: checked, kept or marked bad, pruned
  fail       record one line from stdin as the cluster's last backup failure"""


def setup(argv: list[str]) -> int:
    """`backup-host-setup USER DIR < authorized_keys_line`: a dedicated user that may only run the
    forced receive command of the line read from stdin, and DIR owned by that user."""
    parser = argparse.ArgumentParser(prog="kcp-host backup-host-setup", description=setup.__doc__)
    parser.add_argument("user")
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    line = sys.stdin.read().strip()
    if not line.startswith("restrict,command=") or "\n" in line:
        raise Abort(1, "refusing an authorized_keys line without a forced command")
    try:
        home = pwd.getpwnam(args.user).pw_dir
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/bash", args.user], check=True)
        home = pwd.getpwnam(args.user).pw_dir
    for path, mode in ((Path(args.dir), 0o750), (Path(home) / ".ssh", 0o700)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        shutil.chown(path, args.user, args.user)
    keys = Path(home) / ".ssh" / "authorized_keys"
    write_atomic(keys, line + "\n", 0o600)
    shutil.chown(keys, args.user, args.user)
    print(f"backup host ready: {args.user} writes only through its forced command into {args.dir}")
    return 0


def link_new(source: Path, target: Path) -> None:
    """Link `source` in as `target`; never replaces an existing file."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise Abort(1, f"{target.name} exists already; files are never replaced") from None


class Store:
    """The cluster's folder on the backup host; snapshot names sort by time."""

    def __init__(self, root: Path, recent: int, daily: int, max_bytes: int) -> None:
        self.root, self.recent, self.daily, self.max_bytes = root, recent, daily, max_bytes
        self.incoming, self.bad, self.status = root / ".incoming", root / "bad", root / "status.json"
        self.pattern = re.compile(rf"{re.escape(root.name)}-[0-9]{{8}}T[0-9]{{6}}Z\.(db|json)")

    def record(self, **changes: Any) -> None:
        update_json(self.status, 0o640, format=1, **changes)

    def receive(self, name: str, source: BinaryIO) -> None:
        """stdin -> .incoming/NAME, linked in only once complete and within the size bound."""
        if not self.pattern.fullmatch(name):
            raise Abort(1, f"refusing file name {name!r}")
        if any((where / name).exists() for where in (self.root, self.bad, self.incoming)):
            raise Abort(1, f"{name} exists already; files are never replaced")
        limit = min(self.max_bytes, META_MAX_BYTES) if name.endswith(".json") else self.max_bytes
        fd, partial = tempfile.mkstemp(prefix=".partial.", dir=self.incoming)
        try:
            with os.fdopen(fd, "wb") as out:
                size = 0
                while size <= limit and (chunk := source.read(min(CHUNK, limit + 1 - size))):
                    out.write(chunk)
                    size += len(chunk)
                if size > limit:
                    raise Abort(1, f"{name} is larger than {limit} bytes")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(partial, 0o640)
            link_new(Path(partial), self.incoming / name)
        finally:
            Path(partial).unlink(missing_ok=True)

    def file_pair(self, base: str) -> None:
        """Its metadata arrived after the .db: keep the pair if intact and not failed, else set it apart."""
        db, meta_path = self.incoming / f"{base}.db", self.incoming / f"{base}.json"
        if not db.is_file():
            meta_path.unlink()
            raise Abort(1, f"{base}.json arrived without {base}.db")
        try:
            meta = read_json(meta_path)
        except RecursionError:
            meta = {}
        reason = ""
        if sha256_of(db) != meta.get("sha256"):
            reason = "sha256 of the received file differs from the recorded one (damaged in transit)"
            write_json(meta_path, {**meta, "verified": False, "verify_error": reason}, 0o640)
        elif meta.get("verified") is False:
            reason = one_line(f"failed verification on {meta.get('member')}: {meta.get('verify_error')}")
        for path in (db, meta_path):
            link_new(path, (self.bad if reason else self.root) / path.name)
            path.unlink()
        if reason:
            self.record(last_failure=utc_iso(), last_failure_reason=f"{base}: {reason}")
            self.prune()
            raise Abort(1, f"{base} stored as bad: {reason}")
        verified = {"last_verified": utc_iso()} if meta.get("verified") is True else {}
        self.record(last_snapshot=base, last_success=utc_iso(), **verified)
        self.prune()

    def snapshots(self, folder: Path) -> list[str]:
        """Names (without suffix) of the snapshots filed in `folder`, newest first."""
        names = (path.name for path in folder.iterdir())
        return sorted((n.removesuffix(".json") for n in names if n.endswith(".json") and self.pattern.fullmatch(n)),
                      reverse=True)

    def kept(self, names: list[str]) -> tuple[set[str], int]:
        """(kept, days): the newest `recent`, plus the first snapshot of each of the newest `daily` UTC days
        (a snapshot can be both)."""
        first_of_day: dict[str, str] = {}
        for name in reversed(names):
            first_of_day.setdefault(name[-16:-8], name)  # <cluster>-YYYYmmdd THHMMSSZ
        days = sorted(first_of_day, reverse=True)[:self.daily]
        return set(names[:self.recent]) | {first_of_day[day] for day in days}, len(days)

    def prune(self) -> None:
        """Retention depends only on the names present, so it is exact and stable; in bad/, the newest 3."""
        names = self.snapshots(self.root)
        kept, days = self.kept(names)
        doomed = [(self.root, n) for n in names if n not in kept]
        doomed += [(self.bad, n) for n in self.snapshots(self.bad)[KEEP_BAD:]]
        for folder, name in doomed:
            for suffix in (".db", ".json"):
                (folder / f"{name}{suffix}").unlink(missing_ok=True)
        # A .db whose metadata never came (the client died between the two uploads) is not a backup.
        for path in self.incoming.iterdir():
            if path.is_file() and path.stat().st_mtime < time.time() - STALE_SECONDS:
                path.unlink()
        self.record(kept_recent=min(len(names), self.recent), kept_daily=days)


def count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-backup-receive", epilog=REQUESTS,
                                     description="the backup host's forced command: add files, never replace",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, metavar="DIR", help="the cluster's folder")
    parser.add_argument("--retain-recent", type=count, required=True, metavar="N")
    parser.add_argument("--retain-daily", type=count, required=True, metavar="N")
    parser.add_argument("--max-bytes", type=count, default=16 << 30, metavar="N", help="default: 16 GiB")
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
