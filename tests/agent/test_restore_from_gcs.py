"""A restore's pick and delta log from a GCS bucket (components/restore/sources.py's `GcsBackups`), through this
machine's own `gcloud storage` against tests/gcs.py's emulator (the `gcs` fixture of this suite's conftest.py). The
objects carry the metadata etcd-backup's uploads give them (kcp_host.destinations.object_metadata)."""

from __future__ import annotations

import fnmatch
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from components.restore import RestoreError
from components.restore.deltas import chained
from components.restore.sources import GcsBackups
from kcp_host import deltalog
from kcp_host.destinations import object_metadata
from tests.agent.test_delta_bucket import HISTORY, chunk
from tests.gcs import BUCKET, custom_metadata, upload

URL = f"gs://{BUCKET}/local"


def store(endpoint: str, snapshot: str, data: bytes, **tags: str) -> None:
    """A verified snapshot as etcd-backup stores it (its .db, then its .json, both with its metadata); `tags`
    override the object metadata."""
    meta = {"name": snapshot, "taken_at": "2026-01-01T00:00:00Z", "revision": 7, "keys": 3, "hashkv": 9,
            "sha256": hashlib.sha256(data).hexdigest(), "verified": True, "cluster_id": HISTORY}
    metadata = {**custom_metadata(object_metadata(meta)), **tags}
    upload(endpoint, f"local/snapshots/{snapshot}.db", data, metadata)
    upload(endpoint, f"local/snapshots/{snapshot}.json", b"{}", metadata)
    time.sleep(0.01)  # one arrival after the other


def restored(wanted: str | None) -> tuple[str, bytes]:
    source = GcsBackups(URL)
    try:
        meta = source.pick(wanted)
        return meta["name"], Path(meta["local_file"]).read_bytes()
    finally:
        source.close()
        assert source.scratch is None


def test_restore_from_gcs_goes_by_arrival_and_refuses_metadata_that_names_another_snapshot(gcs: str) -> None:
    with pytest.raises(RestoreError, match="no verified snapshot found"):
        restored(None)
    first, second = "local-20260101T000000Z", "local-20250101T000000Z"  # the later arrival has the older name
    store(gcs, first, b"first")
    store(gcs, second, b"second")
    store(gcs, "local-20270101T000000Z", b"forged", name=first)  # newest of all, but it says it is another
    store(gcs, "local-20280101T000000Z", b"no numbers", revision="")
    assert restored(None) == (second, b"second")
    assert restored(first) == (first, b"first")
    with pytest.raises(RestoreError, match="its object metadata names 'local-20260101T000000Z'; refusing it"):
        restored("local-20270101T000000Z")
    with pytest.raises(RestoreError, match="lacks revision, keys or hashkv; refusing it"):
        restored("local-20280101T000000Z")
    with pytest.raises(RestoreError, match="no snapshot named local-19990101T000000Z"):
        restored("local-19990101T000000Z")


def test_restore_from_gcs_names_the_generation_it_listed_and_says_what_the_cli_answered(
        gcs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store(gcs, "local-20260101T000000Z", b"snapshot")
    source = GcsBackups(URL)
    asked: list[list[str]] = []
    cli = source.cli
    monkeypatch.setattr(source, "cli", lambda argv, *args, **kwargs: asked.append(argv) or cli(argv, *args, **kwargs))
    try:
        meta = source.pick(None)
    finally:
        source.close()
    assert asked[-1][:4] == ["gcloud", "storage", "cp", "--quiet"]
    assert asked[-1][4] == f"gs://{BUCKET}/local/snapshots/local-20260101T000000Z.db#{meta['_generation']}"
    with pytest.raises(RestoreError, match=r"gcloud storage objects list on gs://no-such-bucket/local failed: .+"):
        GcsBackups("gs://no-such-bucket/local").pick(None)
    with pytest.raises(RestoreError, match="expected gs://BUCKET/PREFIX"):
        GcsBackups("gs:///local")


def chunks_in(endpoint: str, *ranges: tuple[int, int], history: str = HISTORY) -> None:
    for first, last in ranges:
        upload(endpoint, f"local/deltas/{history}/{deltalog.bucket_chunk_name(first)}", chunk(first, last),
               {"last": str(last)})


def downloaded(base: dict[str, Any]) -> list[dict[str, Any]]:
    """What GcsBackups.deltas lists for `base`, checked to be exactly what it downloaded."""
    source = GcsBackups(URL)
    try:
        listed = source.deltas(base)
        folder = source.chunks.path
        assert (sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []) == [c["name"] for c in listed]
        assert [deltalog.decode(data).first for data in source.fetch_deltas(listed)] == [c["first"] for c in listed]
        return listed
    finally:
        source.close()


def test_gcs_restore_downloads_only_the_chunks_a_chain_from_the_snapshot_can_use(gcs: str) -> None:
    """As from S3 (test_delta_bucket.py): the chunks from before the snapshot stay in the bucket, a forged one that
    arrived after it is read, and the chain refuses it."""
    chunks_in(gcs, *((first, first + 4) for first in range(1, 30, 5)))
    chunks_in(gcs, (11, 12), history="ffffffffffffffff")  # another cluster's log: not this snapshot's
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # every chunk arrived long before this snapshot
    for revision, starts in ((12, [11, 16, 21, 26]), (10, [11, 16, 21, 26]), (9, [6, 11, 16, 21, 26]),
                             (0, [1, 6, 11, 16, 21, 26]), (40, [26])):
        listed = downloaded({"cluster_id": HISTORY, "revision": revision, "taken_at": later})
        assert [c["first"] for c in listed] == starts, f"from revision {revision}"
        assert "refused" not in str(listed)
    chunks_in(gcs, (12, 15))  # named inside the chunk that holds revision 13, and ending where it does
    base = {"name": "s", "cluster_id": HISTORY, "revision": 12, "taken_at": datetime.now(UTC).isoformat()}
    listed = downloaded(base)
    assert [c["first"] for c in listed] == [1, 6, 11, 12, 16, 21, 26], "arrived since the snapshot: read"
    with pytest.raises(RestoreError, match=r"overlap: chunk 12\.\.15"):
        chained(base, listed, None)
    assert GcsBackups(URL).deltas({"revision": 10}) == [], "a snapshot that records no cluster ID has no log"
    assert downloaded({"cluster_id": "0123456789abcdef", "revision": 10, "taken_at": later}) == [], "an empty log"


def test_in_a_versioned_gcs_bucket_a_later_generation_of_a_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gcloud storage objects list` lists noncurrent generations too, which only a versioned bucket keeps (the
    stack's is not: its retention policy excludes versioning); there the first generation is the one, as on S3."""
    name = "local-20260101T000000Z"
    tags = custom_metadata(object_metadata({"name": name, "revision": 7, "keys": 3, "hashkv": 9, "verified": True}))
    chunk_name = f"local/deltas/{HISTORY}/{deltalog.bucket_chunk_name(11)}"
    listed = [{"name": f"local/snapshots/{name}.db", "generation": "20", "size": "6", "metadata": tags,
               "timeCreated": "2026-01-02T00:00:00.000Z"},
              {"name": f"local/snapshots/{name}.db", "generation": "10", "size": "5", "metadata": tags,
               "timeCreated": "2026-01-01T00:00:00.000Z"},
              {"name": chunk_name, "generation": "30", "timeCreated": "2026-01-03T00:00:00.000Z"},
              {"name": chunk_name, "generation": "40", "timeCreated": "2026-01-04T00:00:00.000Z"}]
    source = GcsBackups(URL)
    monkeypatch.setattr(source, "objects", lambda pattern: [o for o in listed if fnmatch.fnmatch(o["name"], pattern)])
    newest, first = source.listing()
    assert (newest["_generation"], newest["refused"]) == ("20", "an upload over an earlier snapshot of the same name")
    assert (first["_generation"], first["file_bytes"], first.get("refused")) == ("10", 5, None)
    _, refused = source.chunk_listing(f"local/deltas/{HISTORY}/")
    assert refused == {"0000000000000011.delta": "more than one generation: an upload over a chunk"}
