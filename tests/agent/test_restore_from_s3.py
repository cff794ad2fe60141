"""A restore's pick from an S3 bucket under Object Lock (components/restore/sources.py's `S3Backups`), against moto's
S3 holding etcd-backup's own uploads (`Bucket.store`): the `locked_bucket` of this suite's conftest.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from components.restore.sources import S3Backups
from kcp_host.contract import BackupEnv
from kcp_host.destinations import Bucket


def test_restore_from_s3_goes_by_arrival_and_keeps_the_first_upload_of_a_name(locked_bucket: str,
                                                                                tmp_path: Path) -> None:
    """Through etcd-backup's own uploads: the lock keeps a version an upload went over, the listing passes over
    the later upload of a name, and a locked version downloads like any other."""
    backup = BackupEnv(dest=f"s3://{locked_bucket}/local", cert="c", key="k", work_dir=str(tmp_path))

    def store(name: str, data: bytes) -> None:
        meta = {"name": name, "taken_at": "2026-01-01T00:00:00Z", "revision": 7, "keys": 3, "hashkv": 9,
                "sha256": hashlib.sha256(data).hexdigest(), "verified": True}
        (tmp_path / f"{name}.db").write_bytes(data)
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        Bucket(backup).store(tmp_path / f"{name}.db", tmp_path / f"{name}.json", meta)
        time.sleep(1.1)  # LastModified has a resolution of one second

    first, second = "local-20260101T000000Z", "local-20250101T000000Z"  # the later arrival has the older name
    store(first, b"first")
    store(second, b"second")
    store(first, b"forged over the first")  # a holder of the etcd role: same name, same key, newest of all

    def restored(wanted: str | None) -> tuple[str, bytes]:
        source = S3Backups(f"s3://{locked_bucket}/local")
        try:
            meta = source.pick(wanted)
            return meta["name"], Path(meta["local_file"]).read_bytes()
        finally:
            source.close()

    assert restored(None) == (second, b"second")
    assert restored(first) == (first, b"first"), "the first upload of the name, which the lock kept"
    versions = json.loads(subprocess.run(
        ["aws", "s3api", "list-object-versions", "--bucket", locked_bucket, "--prefix", f"local/snapshots/{first}.db"],
        capture_output=True, text=True, check=True).stdout)["Versions"]
    assert len(versions) == 2
    for version in versions:
        deleted = subprocess.run(["aws", "s3api", "delete-object", "--bucket", locked_bucket, "--key", version["Key"],
                                  "--version-id", version["VersionId"]], capture_output=True, text=True, check=False)
        assert deleted.returncode != 0 and "AccessDenied" in deleted.stderr, deleted
