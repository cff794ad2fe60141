"""Where etcd-backup puts a snapshot (`KCP_BACKUP_DEST`): the backup host's receiver over SSH, or a
versioned bucket (gs://, s3://) with fixed keys. Layouts and the reasons for them: docs/backups.md.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kcp_host.contract import BackupEnv
from kcp_host.files import write_atomic

# Carried by every uploaded object version (`taken_at` as `taken-at`), so a version can be chosen
# without downloading its .json.
OBJECT_METADATA = ("name", "taken_at", "revision", "keys", "hashkv", "sha256", "verified")


class UploadError(Exception):
    """The destination did not take a file; the message says which."""


class Receiver:
    """The backup host's forced command (`kcp-host etcd-backup-receive`): only `put NAME` and `fail`."""

    def __init__(self, backup: BackupEnv) -> None:
        if not backup.ssh_key:
            raise UploadError("KCP_BACKUP_SSH_KEY is needed for ssh:// destinations")
        url = urlsplit(backup.dest)
        options = ("BatchMode=yes", "ConnectTimeout=10", "ServerAliveInterval=10", "StrictHostKeyChecking=accept-new",
                   f"UserKnownHostsFile={backup.ssh_known_hosts}")
        self.argv = ["ssh", "-i", backup.ssh_key, "-p", str(url.port or 22),
                     *(arg for option in options for arg in ("-o", option)), f"{url.username}@{url.hostname}"]

    def request(self, *words: str, payload: Path | bytes) -> None:
        """One request; the receiver's own complaint (if any) reaches the journal through stderr."""
        if isinstance(payload, Path):
            with payload.open("rb") as source:
                code = subprocess.run([*self.argv, *words], stdin=source, check=False).returncode
        else:
            code = subprocess.run([*self.argv, *words], input=payload, check=False).returncode
        if code != 0:
            raise UploadError(f"the backup host refused `{' '.join(words)}` (exit {code})")

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        # The metadata goes last: its arrival is what makes the receiver file the snapshot.
        for path in (db, meta_path):
            self.request("put", path.name, payload=path)

    def publish_status(self, status: Path) -> None:
        """The backup host writes its own status.json."""

    def report_failure(self, line: str, status: Path) -> None:
        self.request("fail", payload=f"{line}\n".encode())


class Bucket:
    """Fixed keys in a versioned bucket; the bucket's lifecycle rules keep the counts."""

    def __init__(self, backup: BackupEnv) -> None:
        self.base = backup.dest.rstrip("/")
        self.marker = Path(backup.work_dir) / ".daily-marker"

    def argv(self, file: Path, url: str, tags: str | None, create_only: bool) -> list[str]:
        if self.base.startswith("gs://"):
            return ["gcloud", "storage", "cp", "--quiet", *(["--if-generation-match=0"] if create_only else []),
                    *([f"--custom-metadata={tags}"] if tags else []), str(file), url]
        if create_only:
            bucket, _, key = url.removeprefix("s3://").partition("/")
            return ["aws", "s3api", "put-object", "--if-none-match", "*", "--bucket", bucket, "--key", key,
                    "--body", str(file)]
        return ["aws", "s3", "cp", "--only-show-errors", *(["--metadata", tags] if tags else []), str(file), url]

    def put(self, file: Path, key: str, tags: str | None = None) -> None:
        url = f"{self.base}/{key}"
        if subprocess.run(self.argv(file, url, tags, create_only=False), check=False).returncode != 0:
            raise UploadError(f"could not store {url}")

    def put_new(self, file: Path, key: str, tags: str) -> bool:
        """Create-only: False when the object exists already (or the request failed)."""
        argv = self.argv(file, f"{self.base}/{key}", tags, create_only=True)
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode == 0

    def put_pair(self, db: Path, meta_path: Path, slot: str, tags: str) -> None:
        self.put(db, f"{slot}/snapshot.db", tags)
        self.put(meta_path, f"{slot}/snapshot.json", tags)

    def store(self, db: Path, meta_path: Path, meta: dict[str, Any]) -> None:
        tags = object_metadata(meta)
        if meta.get("verified") is False:
            self.put_pair(db, meta_path, "bad", tags)
            return
        self.put_pair(db, meta_path, "recent", tags)
        # Create-only: succeeds for the first verified snapshot of the UTC day, cluster-wide.
        write_atomic(self.marker, f"{meta['name']}\n", 0o600)
        if self.put_new(self.marker, f"daily-markers/{time.strftime('%Y-%m-%d', time.gmtime())}", tags):
            self.put_pair(db, meta_path, "daily", tags)

    def publish_status(self, status: Path) -> None:
        self.put(status, "status.json")

    def report_failure(self, line: str, status: Path) -> None:
        self.publish_status(status)


def destination(backup: BackupEnv) -> Receiver | Bucket:
    """The destination's client; each has `store`, `publish_status` and `report_failure`."""
    if backup.dest.startswith("ssh://"):
        return Receiver(backup)
    if backup.dest.startswith(("gs://", "s3://")):
        return Bucket(backup)
    raise UploadError(f"unsupported KCP_BACKUP_DEST {backup.dest}")


def object_metadata(meta: dict[str, Any]) -> str:
    """`name=...,taken-at=...,...`: strings as they are, other values as JSON (true, 42, null)."""
    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)
    return ",".join(f"{key.replace('_', '-')}={text(meta.get(key, ''))}" for key in OBJECT_METADATA)
