"""Where etcd-backup puts a snapshot (`KCP_BACKUP_DEST`): the backup host's receiver over SSH, or a
bucket (gs://, s3://) with one new object per file, which the bucket's retention lock keeps. Layouts and the
reasons for them: docs/backups.md.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from kcp_host.contract import BackupEnv
from kcp_host.files import one_line, utc_stamp


class UploadError(Exception):
    """The destination did not take a file; the message says which. A receiver's exit code and, when captured, its
    stderr come along for callers that tell its refusals from lost connections."""

    def __init__(self, message: str, code: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.code, self.stderr = code, stderr


class DeltaRefused(UploadError):
    """The receiver refused a chunk (exit 1; `stderr` says why: an overlap, a gap, not a chunk): sending it again
    cannot help, `Receiver.delta_next` says where the chain goes on."""


class Receiver:
    """The backup host's forced command (`kcp-host etcd-backup-receive`): `put NAME`, `fail`, `delta FIRST LAST`
    and `delta-next`."""

    def __init__(self, backup: BackupEnv) -> None:
        url = urlsplit(backup.dest)
        # The program ships known_hosts with the backup host's pinned key: then no other key is accepted. Without
        # one (trustOnFirstUse and no hostKey) the first key seen is learned, and later ones must match it.
        pinned = Path(backup.ssh_known_hosts).is_file()
        options = ("BatchMode=yes", "ConnectTimeout=10", "ServerAliveInterval=10",
                   f"StrictHostKeyChecking={'yes' if pinned else 'accept-new'}",
                   f"UserKnownHostsFile={backup.ssh_known_hosts}", "GlobalKnownHostsFile=/dev/null")
        self.argv = ["ssh", "-i", backup.ssh_key, "-p", str(url.port or 22),
                     *(arg for option in options for arg in ("-o", option)), f"{url.username}@{url.hostname}"]

    def request(self, *words: str, stdin: IO[bytes] | None = None, data: bytes | None = None,
                capture: bool = False) -> bytes:
        """The receiver's own complaint (if any) reaches the journal through stderr; with `capture` it is also kept
        for the UploadError, and its stdout is returned."""
        pipe = subprocess.PIPE if capture else None
        result = subprocess.run([*self.argv, *words], stdin=stdin, input=data, stdout=pipe, stderr=pipe, check=False)
        complaint = (result.stderr or b"").decode("utf-8", "replace")
        if complaint:
            print(complaint, end="", file=sys.stderr, flush=True)
        if result.returncode != 0:
            raise UploadError(f"the backup host refused `{' '.join(words)}` (exit {result.returncode})",
                              result.returncode, complaint.strip())
        return result.stdout or b""

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        for path in (db, meta_path):  # the metadata goes last: its arrival files the snapshot
            with path.open("rb") as source:
                self.request("put", path.name, stdin=source)

    def report(self, status: Path, failure: str = "") -> None:
        """The backup host writes its own status.json; it only needs to hear of failures."""
        if failure:
            self.request("fail", data=f"{failure}\n".encode())

    def delta(self, chunk: bytes, first: int, last: int) -> None:
        """One delta log chunk (deltalog.encode) of revisions first..last; DeltaRefused if it is not the chain's
        next, plain UploadError if the backup host was not reached."""
        try:
            self.request("delta", str(first), str(last), data=chunk, capture=True)
        except UploadError as error:
            if error.code == 1:  # the receiver's Abort; ssh's own failures exit 255
                raise DeltaRefused(f"{error}: {one_line(error.stderr)}", error.code, error.stderr) from None
            raise

    def delta_next(self) -> tuple[int | None, list[int]]:
        """Where the archiver resumes (after a leader change or a refusal): the chain's next revision (None before
        the first chunk) and the kept snapshots' revisions, after one of which a new segment may start."""
        out = self.request("delta-next", data=b"", capture=True)
        with contextlib.suppress(ValueError, TypeError, KeyError, RecursionError):
            answer = json.loads(out)
            after, revisions = answer["next"], answer["snapshot_revisions"]
            if (after is None or whole(after)) and isinstance(revisions, list) and all(map(whole, revisions)):
                return after, revisions
        raise UploadError(f"the backup host's answer to `delta-next` is not one: {out[:200]!r}")


class Bucket:
    """New keys only, created once (`<prefix>/snapshots/<name>.db|.json`); the bucket's retention lock keeps every
    object for its period and its lifecycle rules delete them by age, so hosts never overwrite or delete."""

    def __init__(self, backup: BackupEnv) -> None:
        self.base = backup.dest.rstrip("/")

    def put(self, file: Path, key: str, tags: str | None = None) -> None:
        url = f"{self.base}/{key}"
        if url.startswith("gs://"):  # create-only: a key that exists already is refused, never replaced
            argv = ["gcloud", "storage", "cp", "--quiet", "--if-generation-match=0",
                    *([f"--custom-metadata={tags}"] if tags else []), str(file), url]
        else:  # Object Lock needs a checksum on every upload; an upload over a key only adds a version
            argv = ["aws", "s3", "cp", "--only-show-errors", "--checksum-algorithm", "CRC32",
                    *(["--metadata", tags] if tags else []), str(file), url]
        if subprocess.run(argv, check=False).returncode != 0:
            raise UploadError(f"could not store {url}")

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        folder, tags = "bad" if meta.get("verified") is False else "snapshots", object_metadata(meta)
        for path in (db, meta_path):
            self.put(path, f"{folder}/{path.name}", tags)

    def report(self, status: Path, failure: str = "") -> None:
        """A new object per report (an existing one cannot be replaced under the lock); the newest is the status."""
        self.put(status, f"status/{utc_stamp()}-{socket.gethostname()}.json")


def destination(backup: BackupEnv) -> Receiver | Bucket:
    """Each has `store` and `report` (the status, or a failure); the renderer allows only these schemes."""
    return Receiver(backup) if backup.dest.startswith("ssh://") else Bucket(backup)


def object_metadata(meta: dict[str, Any]) -> str:
    """Carried by every object version, so a version can be chosen without its .json; JSON but for strings."""
    keys = ("name", "taken_at", "revision", "keys", "hashkv", "sha256", "verified")
    values = ((key.replace("_", "-"), meta.get(key, "")) for key in keys)
    return ",".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values)


def whole(value: Any) -> bool:
    """A revision as JSON has it: not a bool, a float or a string of digits."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
