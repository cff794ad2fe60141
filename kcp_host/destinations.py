"""Where etcd-backup puts a snapshot (`KCP_BACKUP_DEST`): the backup host's receiver over SSH, or a
versioned bucket (gs://, s3://) with fixed keys. Layouts and the reasons for them: docs/backups.md.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from kcp_host.contract import BackupEnv
from kcp_host.files import write_atomic


class UploadError(Exception):
    """The destination did not take a file; the message says which."""


class Receiver:
    """The backup host's forced command (`kcp-host etcd-backup-receive`): only `put NAME` and `fail`."""

    def __init__(self, backup: BackupEnv) -> None:
        url = urlsplit(backup.dest)
        options = ("BatchMode=yes", "ConnectTimeout=10", "ServerAliveInterval=10", "StrictHostKeyChecking=accept-new",
                   f"UserKnownHostsFile={backup.ssh_known_hosts}")
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
    """Fixed keys in a versioned bucket; the bucket's lifecycle rules keep the counts."""

    def __init__(self, backup: BackupEnv) -> None:
        self.base = backup.dest.rstrip("/")
        self.marker = Path(backup.work_dir) / ".daily-marker"

    def put(self, file: Path, key: str, tags: str | None = None, create_only: bool = False) -> bool:
        """A create-only put answers False, quietly, where the object exists already (or the request failed)."""
        url = f"{self.base}/{key}"
        if url.startswith("gs://"):
            argv = ["gcloud", "storage", "cp", "--quiet", *(["--if-generation-match=0"] if create_only else []),
                    *([f"--custom-metadata={tags}"] if tags else []), str(file), url]
        elif create_only:
            bucket, _, path = url.removeprefix("s3://").partition("/")
            argv = ["aws", "s3api", "put-object", "--if-none-match", "*", "--bucket", bucket, "--key", path,
                    "--body", str(file)]
        else:
            argv = ["aws", "s3", "cp", "--only-show-errors", *(["--metadata", tags] if tags else []), str(file), url]
        quiet = subprocess.DEVNULL if create_only else None
        done = subprocess.run(argv, stdout=quiet, stderr=quiet, check=False).returncode == 0
        if not done and not create_only:
            raise UploadError(f"could not store {url}")
        return done

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        tags = object_metadata(meta)
        for slot in ("bad",) if meta.get("verified") is False else ("recent", "daily"):
            if slot == "daily":  # the first verified snapshot of the UTC day, cluster-wide, creates its marker
                write_atomic(self.marker, f"{meta['name']}\n", 0o600)
                day = time.strftime("%Y-%m-%d", time.gmtime())
                if not self.put(self.marker, f"daily-markers/{day}", tags, create_only=True):
                    return
            for path in (db, meta_path):
                self.put(path, f"{slot}/snapshot{path.suffix}", tags)

    def report(self, status: Path, failure: str = "") -> None:
        self.put(status, "status.json")


def destination(backup: BackupEnv) -> Receiver | Bucket:
    """Each has `store` and `report` (the status, or a failure); the renderer allows only these schemes."""
    return Receiver(backup) if backup.dest.startswith("ssh://") else Bucket(backup)


def object_metadata(meta: dict[str, Any]) -> str:
    """Carried by every object version, so a version can be chosen without its .json; JSON but for strings."""
    keys = ("name", "taken_at", "revision", "keys", "hashkv", "sha256", "verified")
    values = ((key.replace("_", "-"), meta.get(key, "")) for key in keys)
    return ",".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values)
