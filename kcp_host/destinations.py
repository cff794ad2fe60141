"""Where etcd-backup puts a snapshot (`KCP_BACKUP_DEST`): the backup host's receiver over SSH, or a
bucket (gs://, s3://) with one new object per file, which the bucket's retention lock keeps. Layouts and the
reasons for them: docs/backups.md.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from kcp_host.contract import BackupEnv
from kcp_host.files import utc_stamp


class UploadError(Exception):
    """The destination did not take a file; the message says which."""


class Receiver:
    """The backup host's forced command (`kcp-host etcd-backup-receive`): only `put NAME` and `fail`."""

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

    def request(self, *words: str, stdin: IO[bytes] | None = None, data: bytes | None = None) -> None:
        """The receiver's own complaint (if any) reaches the journal through stderr."""
        code = subprocess.run([*self.argv, *words], stdin=stdin, input=data, check=False).returncode
        if code != 0:
            raise UploadError(f"the backup host refused `{' '.join(words)}` (exit {code})")

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        for path in (db, meta_path):  # the metadata goes last: its arrival files the snapshot
            with path.open("rb") as source:
                self.request("put", path.name, stdin=source)

    def report(self, status: Path, failure: str = "") -> None:
        """The backup host writes its own status.json; it only needs to hear of failures."""
        if failure:
            self.request("fail", data=f"{failure}\n".encode())


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
