"""Where etcd-backup puts a snapshot and etcd-delta-archive the delta log (`KCP_BACKUP_DEST`): the backup host's
receiver over SSH, or a bucket (gs://, s3://) with one new object per file, which the bucket's retention lock keeps.
Layouts and the reasons for them: docs/backups.md.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import IO, Any, TypeGuard
from urllib.parse import urlsplit

from kcp_host import clouds, deltalog
from kcp_host.contract import BackupEnv
from kcp_host.files import one_line, read_json, utc_stamp


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

    def delta(self, chunk: bytes, first: int, last: int, history: str) -> None:
        """One delta log chunk (deltalog.encode) of revisions first..last; DeltaRefused if it is not the chain's
        next, plain UploadError if the backup host was not reached. `history` is not needed here: a restore moves
        the backup host's log aside."""
        try:
            self.request("delta", str(first), str(last), data=chunk, capture=True)
        except UploadError as error:
            if error.code == 1:  # the receiver's Abort; ssh's own failures exit 255
                raise DeltaRefused(f"{error}: {one_line(error.stderr)}", error.code, error.stderr) from None
            raise

    def delta_next(self, history: str) -> tuple[int | None, list[int]]:
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
        self.base, self.work_dir = backup.dest.rstrip("/"), backup.work_dir

    def put(self, file: Path, key: str, tags: str | None = None) -> None:
        url = f"{self.base}/{key}"
        if url.startswith("gs://"):  # create-only: a key that exists already is refused, never replaced
            argv = gcs_create(file, url, tags)
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

    def delta(self, chunk: bytes, first: int, last: int, history: str) -> None:
        """One chunk as `deltas/<history>/<first>.delta`, its last revision in the object's metadata, created only if
        no chunk starts at `first` yet: of two archivers resuming at one revision the bucket takes one, the other gets
        DeltaRefused and asks delta_next again. A bucket cannot refuse a gap: the archiver only ever starts at the
        chain's next revision or right after a kept snapshot, and the restore refuses a chain that breaks."""
        url = f"{self.base}/deltas/{history}/{deltalog.bucket_chunk_name(first)}"
        with tempfile.NamedTemporaryFile(dir=self.work_dir, prefix=".delta-") as file:
            file.write(chunk)
            file.flush()
            if url.startswith("gs://"):
                argv = gcs_create(Path(file.name), url, f"last={last}")
            else:
                bucket, _, key = url.removeprefix("s3://").partition("/")
                argv = ["aws", "s3api", "put-object", "--bucket", bucket, "--key", key, "--body", file.name,
                        "--if-none-match", "*", "--checksum-algorithm", "CRC32", "--metadata", f"last={last}",
                        "--output", "text", "--query", "VersionId"]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            complaint = one_line(proc.stderr)
            if any(word in complaint for word in PRECONDITION_FAILED):
                raise DeltaRefused(f"{url} exists: another archiver shipped a chunk from revision {first}", 1,
                                   complaint)
            raise UploadError(f"could not store {url}: {complaint}")

    def delta_next(self, history: str) -> tuple[int | None, list[int]]:
        """The chain's next revision: after the last revision (object metadata) of the chunk that starts latest in
        `deltas/<history>/`. A bucket does not tell hosts its snapshots: a new segment starts after the one this
        host stored last (status.json), when it is of this history."""
        url = f"{self.base}/deltas/{history}/"
        newest = self.newest_chunk(url)
        if newest is None:
            return None, stored_here(self.work_dir, history)
        first, last = newest
        if not (last.isdigit() and int(last) >= first):
            raise UploadError(f"the chunk from revision {first} in {url} carries no last revision at or after its "
                              f"first: {last[:40]!r}")
        return int(last) + 1, stored_here(self.work_dir, history)

    @staticmethod
    def newest_chunk(url: str) -> tuple[int, str] | None:
        """(first revision, its `last` metadata as text) of the chunk under `url` that starts latest; None: none.
        GCS lists the metadata with the names; S3 only names, so the newest is asked for its own."""
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        if url.startswith("gs://"):
            found = {int(match[1]): str((item.get("metadata") or {}).get("last", ""))
                     for item in gcs_listing(bucket, prefix)
                     if (match := deltalog.BUCKET_CHUNK.fullmatch(str(item.get("name", "")).removeprefix(prefix)))}
            return max(found.items()) if found else None
        keys = json.loads(bucket_cli(["aws", "s3api", "list-objects-v2", "--bucket", bucket, "--prefix", prefix,
                                      "--query", "Contents[].Key", "--output", "json"], url) or "null") or []
        starts = {int(match[1]): key for key in keys
                  if (match := deltalog.BUCKET_CHUNK.fullmatch(str(key).removeprefix(prefix)))}
        if not starts:
            return None
        first = max(starts)
        return first, bucket_cli(["aws", "s3api", "head-object", "--bucket", bucket, "--key", starts[first],
                                  "--query", "Metadata.last", "--output", "text"], url)


# What S3 (PreconditionFailed; ConditionalRequestConflict for two at once) and GCS (HTTP 412) say to a create-only
# upload of a name that exists: both quote the precondition's own words.
PRECONDITION_FAILED = ("pre-conditions you specified did not hold", "ConditionalRequestConflict")


def gcs_create(file: Path, url: str, metadata: str | None) -> list[str]:
    """`gcloud storage cp` that only creates: a name that exists already is refused (HTTP 412), never replaced."""
    return ["gcloud", "storage", "cp", "--quiet", "--if-generation-match=0",
            *([f"--custom-metadata={metadata}"] if metadata else []), str(file), url]


def bucket_cli(argv: list[str], url: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise UploadError(f"cannot read the delta log at {url}: {one_line(proc.stderr)}")
    return proc.stdout.strip()


def gcs_listing(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Objects under `prefix` with their custom metadata (the JSON API lists it; `gcloud storage` prints it in a
    format of its own), with the instance's token."""
    items: list[dict[str, Any]] = []
    page = ""
    try:
        token = clouds.gce_token(clouds.GCE_METADATA)
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "fields": "items(name,metadata),nextPageToken",
                                            **({"pageToken": page} if page else {})})
            answer = json.loads(clouds.http(f"{clouds.GCS_API}/storage/v1/b/{bucket}/o?{query}",
                                            {"Authorization": f"Bearer {token}"})[1])
            items += answer.get("items", [])
            if not (page := answer.get("nextPageToken", "")):
                return items
    except (clouds.CloudError, ValueError, KeyError) as error:
        raise UploadError(f"cannot list gs://{bucket}/{prefix}: {error}") from None


def stored_here(work_dir: str, history: str) -> list[int]:
    """The revision of the snapshot this host stored last (status.json's `last_snapshot`, set only once it was
    verified and stored), when it was taken of the cluster `history` names; the leader takes every snapshot."""
    work = Path(work_dir)
    name = read_json(work / "status.json").get("last_snapshot")
    meta = read_json(work / f"{name}.json") if isinstance(name, str) and "/" not in name else {}
    revision = meta.get("revision")
    return [revision] if meta.get("cluster_id") == history and whole(revision) else []


def destination(backup: BackupEnv) -> Receiver | Bucket:
    """Each has `store` and `report` (the status, or a failure); the renderer allows only these schemes."""
    return Receiver(backup) if backup.dest.startswith("ssh://") else Bucket(backup)


def object_metadata(meta: dict[str, Any]) -> str:
    """Carried by every object version, so a version can be chosen without its .json; JSON but for strings."""
    keys = ("name", "taken_at", "revision", "keys", "hashkv", "sha256", "verified", "cluster_id")
    values = ((key.replace("_", "-"), meta.get(key, "")) for key in keys)
    return ",".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values)


def whole(value: Any) -> TypeGuard[int]:
    """A revision as JSON has it: not a bool, a float or a string of digits."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
