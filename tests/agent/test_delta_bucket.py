"""The delta log in a bucket: the archiver's side (`Bucket.delta`, `Bucket.delta_next` in kcp_host/destinations.py)
and the restore's (`S3Backups.deltas`, `ChunkFolder` in components/restore/sources.py; GCS's in
test_restore_from_gcs.py).

S3 through this venv's AWS CLI against moto's S3 (the `locked_bucket` of this suite's conftest.py: versioned, Object
Lock); GCS through a stand-in `gcloud` on PATH for the upload and a loopback HTTP server for the metadata server
and the JSON API's listing (this machine's `gcloud` reaches no GCS, and tests/gcs.py's emulator does not take its
uploads).
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from components.restore import RestoreError
from components.restore.deltas import chained
from components.restore.sources import ChunkFolder, S3Backups, chunk_names, chunks_to_read, names_from
from kcp_host import clouds, deltalog
from kcp_host.contract import BackupEnv
from kcp_host.destinations import Bucket, DeltaRefused, UploadError

HISTORY = "00112233aabbccdd"


def chunk(first: int, last: int) -> bytes:
    rows = tuple(deltalog.Revision(rev, 1.0, (("put", "a2V5", "dmFsdWU=", 0),)) for rev in range(first, last + 1))
    return deltalog.Chunk("local", "h1", "2026-12-01T00:00:00Z", rows).encode()


def stored_snapshot(work: Path, revision: int, cluster_id: str) -> None:
    """What etcd-backup leaves in its work dir once a snapshot was verified and stored."""
    (work / "status.json").write_text(json.dumps({"last_snapshot": "local-20261201T000000Z"}))
    (work / "local-20261201T000000Z.json").write_text(json.dumps({"revision": revision, "cluster_id": cluster_id}))


def test_s3_takes_one_chunk_per_first_revision_and_says_where_the_chain_goes_on(locked_bucket: str,
                                                                              tmp_path: Path) -> None:
    bucket = Bucket(BackupEnv(dest=f"s3://{locked_bucket}/local", cert="c", key="k", work_dir=str(tmp_path)))
    assert bucket.delta_next(HISTORY) == (None, []), "no chain, no snapshot stored here"
    stored_snapshot(tmp_path, 10, HISTORY)
    assert bucket.delta_next(HISTORY) == (None, [10])
    assert bucket.delta_next("ffffffffffffffff") == (None, []), "a snapshot of another cluster starts no segment"
    bucket.delta(chunk(11, 15), 11, 15, HISTORY)
    bucket.delta(chunk(16, 16), 16, 16, HISTORY)
    assert bucket.delta_next(HISTORY) == (17, [10])
    with pytest.raises(DeltaRefused, match="another archiver shipped a chunk from revision 16"):
        bucket.delta(chunk(16, 20), 16, 20, HISTORY)
    assert bucket.delta_next(HISTORY) == (17, [10]), "the refused chunk changed nothing"
    keys = json.loads(subprocess.run(["aws", "s3api", "list-object-versions", "--bucket", locked_bucket],
                                     capture_output=True, text=True, check=True).stdout)["Versions"]
    assert sorted(v["Key"] for v in keys) == [f"local/deltas/{HISTORY}/{deltalog.bucket_chunk_name(n)}"
                                              for n in (11, 16)], "one version of each, nothing else"
    assert not list(tmp_path.glob(".delta-*")), "the upload's temporary file is gone"


def test_s3_a_chunk_without_its_last_revision_is_no_answer(locked_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(chunk(11, 15))
    subprocess.run(["aws", "s3api", "put-object", "--bucket", locked_bucket, "--key",
                    f"local/deltas/{HISTORY}/{deltalog.bucket_chunk_name(11)}", "--body", str(tmp_path / "c"),
                    "--checksum-algorithm", "CRC32", "--metadata", "last=9"], capture_output=True, check=True)
    bucket = Bucket(BackupEnv(dest=f"s3://{locked_bucket}/local", cert="c", key="k", work_dir=str(tmp_path)))
    with pytest.raises(UploadError, match="carries no last revision at or after its first: '9'"):
        bucket.delta_next(HISTORY)


def test_s3_restore_reads_the_log_of_the_snapshots_cluster_and_refuses_an_upload_over_a_chunk(
        locked_bucket: str, tmp_path: Path) -> None:
    bucket = Bucket(BackupEnv(dest=f"s3://{locked_bucket}/local", cert="c", key="k", work_dir=str(tmp_path)))
    for first, last in ((11, 15), (16, 20)):
        bucket.delta(chunk(first, last), first, last, HISTORY)
    bucket.delta(chunk(11, 12), 11, 12, "ffffffffffffffff")  # another cluster's log: not this snapshot's
    (tmp_path / "c").write_bytes(chunk(16, 30))  # a holder of the etcd role, without the precondition
    subprocess.run(["aws", "s3api", "put-object", "--bucket", locked_bucket, "--key",
                    f"local/deltas/{HISTORY}/{deltalog.bucket_chunk_name(16)}", "--body", str(tmp_path / "c"),
                    "--checksum-algorithm", "CRC32"], capture_output=True, check=True)
    source = S3Backups(f"s3://{locked_bucket}/local")
    try:
        listed = {c["name"]: c for c in source.deltas({"cluster_id": HISTORY, "revision": 10})}
        assert (listed["0000000000000011.delta"]["first"], listed["0000000000000011.delta"]["last"]) == (11, 15)
        assert "refused" not in listed["0000000000000011.delta"]
        assert listed["0000000000000016.delta"]["refused"] == "more than one version: an upload over a chunk"
        assert set(listed) == {"0000000000000011.delta", "0000000000000016.delta"}
        good = [listed["0000000000000011.delta"]]
        assert [deltalog.decode(d).last for d in source.fetch_deltas(good)] == [15]
        assert source.deltas({"revision": 10}) == [], "a snapshot that records no cluster ID has no log"
    finally:
        source.close()
    assert source.scratch is None


def test_s3_restore_downloads_only_the_chunks_a_chain_from_the_snapshot_can_use(locked_bucket: str,
                                                                               tmp_path: Path) -> None:
    """A log kept for days holds thousands of chunks from before the newest snapshot: the restore leaves them, and
    still refuses a forged chunk that arrived after the snapshot and overlaps the chain's first one."""
    bucket = Bucket(BackupEnv(dest=f"s3://{locked_bucket}/local", cert="c", key="k", work_dir=str(tmp_path)))
    for first in range(1, 30, 5):
        bucket.delta(chunk(first, first + 4), first, first + 4, HISTORY)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # every chunk arrived long before this snapshot
    for revision, starts in ((12, [11, 16, 21, 26]), (10, [11, 16, 21, 26]), (9, [6, 11, 16, 21, 26]),
                             (0, [1, 6, 11, 16, 21, 26]), (30, [26]),
                             (40, [26])):  # 26 may hold 41: only its header says where it ends
        listed = downloaded({"cluster_id": HISTORY, "revision": revision, "taken_at": later}, locked_bucket)
        assert [c["first"] for c in listed] == starts, f"from revision {revision}"
        assert "refused" not in str(listed)
        if revision == 12:
            links = chained({"name": "s", "revision": 12}, listed, None)
            assert [(link["first"], link["last"]) for link in links] == [(11, 15), (16, 20), (21, 25), (26, 30)]
    # Named inside the chunk that holds revision 13, and ending where it does: alone, it would pass for it.
    (tmp_path / "forged").write_bytes(chunk(12, 15))
    subprocess.run(["aws", "s3api", "put-object", "--bucket", locked_bucket, "--key",
                    f"local/deltas/{HISTORY}/{deltalog.bucket_chunk_name(12)}", "--body", str(tmp_path / "forged"),
                    "--checksum-algorithm", "CRC32"], capture_output=True, check=True)
    base = {"name": "s", "cluster_id": HISTORY, "revision": 12, "taken_at": datetime.now(UTC).isoformat()}
    listed = downloaded(base, locked_bucket)
    assert [c["first"] for c in listed] == [1, 6, 11, 12, 16, 21, 26], "arrived since the snapshot: read"
    with pytest.raises(RestoreError, match=r"overlap: chunk 12\.\.15"):
        chained(base, listed, None)
    assert [c["first"] for c in downloaded({**base, "taken_at": None}, locked_bucket)] == [1, 6, 11, 12, 16, 21, 26]


def downloaded(base: dict[str, Any], bucket: str) -> list[dict[str, Any]]:
    """What S3Backups.deltas lists for `base`, checked to be exactly what it downloaded."""
    source = S3Backups(f"s3://{bucket}/local")
    try:
        listed = source.deltas(base)
        assert sorted(p.name for p in source.chunks.path.iterdir()) == [c["name"] for c in listed]
        return listed
    finally:
        source.close()


@pytest.mark.parametrize("first", [0, 1, 9, 10, 12345, 10**16 - 1, 10**16, 10**18 + 7])
def test_the_download_patterns_match_exactly_the_chunk_names_from_a_revision_on(first: int) -> None:
    """Names are 16 digits, more past revision 10**16 - 1; the AWS CLI matches --include patterns with fnmatch."""
    patterns = names_from(first)
    for revision in {*range(0, 120), first - 1, first, first + 1, 10**16 - 1, 10**16, 10**17 + 3, 10**19 - 1}:
        name = deltalog.bucket_chunk_name(revision)
        assert any(fnmatch.fnmatchcase(name, p) for p in patterns) == (revision >= first), (first, name)


def test_a_restore_reads_the_chunk_holding_its_next_revision_on_and_every_one_that_arrived_since_the_snapshot() -> None:
    taken = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    listed = [(deltalog.bucket_chunk_name(first), taken + timedelta(minutes=minutes)) for first, minutes in
              ((1, -300), (6, -60), (11, -14), (16, 5), (21, 10))] + [("notes.delta", taken)]
    assert chunks_to_read(listed, 17, taken) == [*names_from(16), "0000000000000011.delta"], \
        "11 arrived within the clocks' skew of the snapshot: read; 1 and 6 arrived long before: not"
    assert chunks_to_read(listed, 12, taken + timedelta(hours=1)) == names_from(11)
    assert chunks_to_read(listed, 3, taken + timedelta(hours=1)) == names_from(1)
    assert chunks_to_read(listed[2:], 3, taken) == names_from(4), "none starts at or before 4: from 4 on"
    assert chunks_to_read([(deltalog.bucket_chunk_name(6), None), listed[2]], 12, taken) == \
        [*names_from(11), "0000000000000006.delta"], "no arrival time: read"
    assert chunks_to_read(listed, 17, None) == ["*"], "no time the snapshot was taken: the whole log"


def test_gcs_downloads_by_name_the_chunks_s3_downloads_by_pattern() -> None:
    """GcsBackups names each chunk it reads (chunk_names), S3Backups has the AWS CLI match patterns: the same set."""
    taken = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    listed = [(deltalog.bucket_chunk_name(first), taken + timedelta(minutes=minutes)) for first, minutes in
              ((1, -300), (6, -60), (11, -14), (16, 5), (21, 10), (10**16 + 3, 20))] + [("notes.delta", taken)]
    for after in (0, 3, 12, 17, 25, 10**16 + 9):
        for when in (taken, taken + timedelta(hours=1), None):
            patterns = chunks_to_read(listed, after, when)
            by_pattern = [name for name, _ in listed if deltalog.BUCKET_CHUNK.fullmatch(name)
                          and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
            assert chunk_names(listed, after, when) == by_pattern, (after, when)
    assert chunk_names(listed, 17, taken) == ["0000000000000011.delta", "0000000000000016.delta",
                                              "0000000000000021.delta", "10000000000000003.delta"]


def test_a_chunk_folder_takes_a_chunks_range_from_its_header_and_refuses_a_misnamed_one(tmp_path: Path) -> None:
    (tmp_path / deltalog.bucket_chunk_name(11)).write_bytes(chunk(11, 15))
    (tmp_path / deltalog.bucket_chunk_name(17)).write_bytes(chunk(16, 20))
    (tmp_path / deltalog.bucket_chunk_name(21)).write_bytes(b"not a chunk\n")
    (tmp_path / "notes.delta").write_bytes(chunk(1, 2))
    folder = ChunkFolder(tmp_path)
    listed = {c["name"]: c for c in folder.deltas()}
    assert set(listed) == {deltalog.bucket_chunk_name(n) for n in (11, 17, 21)}
    assert (listed["0000000000000011.delta"]["last"], listed["0000000000000011.delta"].get("refused")) == (15, None)
    assert listed["0000000000000017.delta"]["refused"] == "its header says it starts at revision 16"
    assert listed["0000000000000021.delta"]["refused"] == "its first line is no chunk header"
    (tmp_path / deltalog.bucket_chunk_name(11)).write_bytes(chunk(11, 14))
    with pytest.raises(RestoreError, match="changed since it was listed"):
        list(folder.fetch([listed["0000000000000011.delta"]]))


class FakeGoogle(BaseHTTPRequestHandler):
    """The metadata server's token and the GCS JSON API's object listing, in pages of two."""

    objects: ClassVar[list[dict[str, Any]]] = []
    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.asked.append(self.path)
        if url.path.endswith("/token"):
            assert self.headers["Metadata-Flavor"] == "Google"
            body: dict[str, Any] = {"access_token": "t0ken"}
        else:
            assert self.headers["Authorization"] == "Bearer t0ken"
            query = parse_qs(url.query)
            items = [o for o in self.objects if o["name"].startswith(query["prefix"][0])]
            start = int(query.get("pageToken", ["0"])[0])
            body = {"items": items[start:start + 2], **({"nextPageToken": str(start + 2)} if start + 2 < len(items)
                                                        else {})}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def google(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The fake Google on loopback, and a stand-in `gcloud` that logs its argv and refuses (HTTP 412) the upload of
    a name in `refuse`. Yields the argv log."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGoogle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(clouds, "GCE_METADATA", f"{base}/computeMetadata/v1")
    monkeypatch.setattr(clouds, "GCS_API", base)
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                                    f'if grep -qF -- "${{8##*/}}" {tmp_path}/refuse 2>/dev/null; then\n'
                                    '  echo "ERROR: HTTPError 412: At least one of the pre-conditions you specified '
                                    'did not hold." >&2; exit 1\nfi\n')
    (bin_dir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    FakeGoogle.objects, FakeGoogle.asked = [], []
    yield log
    server.shutdown()


def test_gcs_uploads_create_only_and_lists_through_the_json_api(google: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bucket = Bucket(BackupEnv(dest="gs://b/c/backups", cert="c", key="k", work_dir=str(work)))
    bucket.delta(chunk(11, 15), 11, 15, HISTORY)
    (argv,) = google.read_text().splitlines()
    assert argv.split()[:5] == ["storage", "cp", "--quiet", "--if-generation-match=0", "--custom-metadata=last=15"]
    assert argv.split()[-1] == f"gs://b/c/backups/deltas/{HISTORY}/0000000000000011.delta"
    (tmp_path / "refuse").write_text("0000000000000011.delta\n")
    with pytest.raises(DeltaRefused):
        bucket.delta(chunk(11, 15), 11, 15, HISTORY)
    prefix = f"c/backups/deltas/{HISTORY}/"
    FakeGoogle.objects = [{"name": f"{prefix}{deltalog.bucket_chunk_name(first)}", "metadata": {"last": str(last)}}
                          for first, last in ((11, 15), (16, 16), (17, 30), (31, 33), (34, 34))]
    FakeGoogle.objects.append({"name": f"c/backups/deltas/ffffffffffffffff/{deltalog.bucket_chunk_name(99)}",
                               "metadata": {"last": "120"}})
    stored_snapshot(work, 10, HISTORY)
    assert bucket.delta_next(HISTORY) == (35, [10])
    listings = [p for p in FakeGoogle.asked if "/storage/v1/b/b/o?" in p]
    assert any("pageToken=4" in p for p in listings), "every page of the listing was read"
