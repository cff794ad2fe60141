"""The delta log end to end on a throwaway etcd on loopback: the archiver ships what is written to the backup host's
receiver (the real one, behind a stand-in ssh), and the replay rebuilds the exact store from a snapshot and the chunks.

Like the real snapshots of test_backup_agent.py, these need etcd, etcdctl and openssl (skipped without them); the
integration tests run the same on the deployed hosts under writes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kcp_host import deltalog
from kcp_host.archive import COMPACT_EVERY_SECONDS, compaction_target
from tests.agent.test_backup_agent import ROOT, EtcdHost, running_etcd

SLOW_UPLOAD_SECONDS = 3


def stop(archiver: subprocess.Popen[bytes]) -> None:
    """With its etcdctl watch, as systemd stops the unit's whole cgroup."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(archiver.pid, signal.SIGKILL)


class Cluster:
    """The live etcd (plain HTTP), its backup host's folder, and the archiver running against both."""

    def __init__(self, root: Path, client: str) -> None:
        (root / "host").mkdir()
        self.host = EtcdHost(root / "host", client, pki=root / "etcd", delta_seconds=1)
        self.client, self.deltas = client, self.host.backup_host / "deltas"

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(["etcdctl", f"--endpoints={self.client}", *args], input=stdin, capture_output=True,
                              text=True, check=True).stdout

    def revision(self) -> int:
        return int(json.loads(self.ctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"])

    def contents(self, revision: int) -> dict[str, int]:
        hashed = json.loads(self.ctl("endpoint", "hashkv", f"--rev={revision}", "-w", "json"))
        count = json.loads(self.ctl("get", "", "--prefix", "--keys-only", "--limit=1", f"--rev={revision}",
                                    "-w", "json"))
        return {"keys": int(count.get("count", 0)), "hashkv": int(hashed[0]["HashKV"]["hash"])}

    @property
    def env(self) -> dict[str, str]:
        root = self.host.root
        return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
                "KCP_CLUSTER_ENV": str(root / "cluster.env"), "KCP_BACKUP_ENV": str(root / "backup.env"),
                "FAKE_ROOT": str(self.host.backup_host), "FAKE_SSH_LOG": str(root / "ssh.log")}

    @contextlib.contextmanager
    def archiving(self, count: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
        """`count` archivers running for the block (more than one: what a leader change can cause for a moment)."""
        archivers = [subprocess.Popen([sys.executable, "-m", "kcp_host", "etcd-delta-archive"], env=self.env,
                                      stderr=subprocess.PIPE, start_new_session=True) for _ in range(count)]
        try:
            yield archivers
        finally:
            for archiver in archivers:
                stop(archiver)
                archiver.wait()

    def put_all(self, prefix: str, count: int, value: str, archivers: list[subprocess.Popen[bytes]]) -> None:
        """`count` keys under `prefix`, then wait until the backup host holds every revision."""
        for i in range(count):
            self.ctl("put", f"{prefix}{i}", value)
        self.wait_archived(self.revision(), archivers)

    def archived_through(self) -> int:
        return max((int(p.name.split("-")[1].split(".")[0]) for p in self.deltas.glob("*.delta")), default=0)

    def wait_archived(self, revision: int, archivers: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + 30
        while self.archived_through() < revision:
            if time.monotonic() > deadline or any(a.poll() is not None for a in archivers):
                for a in archivers:
                    stop(a)
                logs = b"".join(a.communicate()[1] for a in archivers).decode()
                raise AssertionError(f"archived through {self.archived_through()}, wanted {revision}:\n{logs}")
            time.sleep(0.2)

    def snapshot(self) -> tuple[Path, dict[str, Any]]:
        (meta,) = [json.loads(p.read_text()) for p in self.host.backup_host.glob("local-*.json")]
        return self.host.backup_host / f"{meta['name']}.db", meta

    def replay(self, chunks: list[Path], until: int | None = None) -> tuple[subprocess.CompletedProcess[bytes],
                                                                              dict[str, Any]]:
        db, _ = self.snapshot()
        body = b"".join(c.read_bytes() for c in chunks)
        proc = subprocess.run([sys.executable, "-m", "kcp_host", "etcd-delta-replay", str(db.stat().st_size),
                               str(len(body)), *([f"--until={until}"] if until else [])],
                              input=db.read_bytes() + body, env=self.env, capture_output=True, timeout=120)
        last = proc.stderr.decode().strip().splitlines()[-1]
        return proc, json.loads(last.removeprefix("result ")) if last.startswith("result ") else {}


@contextlib.contextmanager
def backed_up_cluster(root: Path) -> Iterator[Cluster]:
    """A live etcd under `root`, with one snapshot on its backup host."""
    (root / "etcd").mkdir()
    with running_etcd(root / "etcd", 20) as client:
        cluster = Cluster(root, client)
        done = cluster.host.run("etcd-backup")
        assert done.returncode == 0, done.stderr.decode()
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with backed_up_cluster(tmp_path) as cluster:
        yield cluster


def write_everything(cluster: Cluster) -> None:
    """Every kind of revision: puts, a delete, a range delete, a multi-key transaction, a key on a lease, a non-ASCII
    multi-line value, then that lease revoked (its keys deleted in one revision)."""
    for i in range(30):
        cluster.ctl("put", f"/new/{i}", f"value {i}")
    cluster.ctl("del", "/k3")
    cluster.ctl("del", "/new/1", "--prefix")  # /new/1, /new/10..19: one revision, eleven deletes
    cluster.ctl("txn", stdin="\nput /t/a 1\nput /t/b 2\n\n\n")
    lease = cluster.ctl("lease", "grant", "600").split()[1]
    cluster.ctl("put", "/leased/a", "x", f"--lease={lease}")
    cluster.ctl("put", "/leased/b", "y", f"--lease={lease}")
    cluster.ctl("put", "/multi-line", "line 1\nline 2 \u00fc\u2603")
    cluster.ctl("lease", "revoke", lease)
    cluster.ctl("put", "/after-revoke", "z")


def test_the_replay_of_the_archived_chain_is_exactly_the_live_store(cluster: Cluster) -> None:
    """Same revision, same keys, same hashkv (which covers every key's value, versions, create revision and lease)."""
    with cluster.archiving() as archivers:
        write_everything(cluster)
        target = cluster.revision()
        cluster.wait_archived(target, archivers)
    _, meta = cluster.snapshot()
    chunks = sorted(cluster.deltas.glob("*.delta"))
    ranges = [(deltalog.decode(c.read_bytes()).first, deltalog.decode(c.read_bytes()).last) for c in chunks]
    assert deltalog.chain(ranges, after=meta["revision"]) == ranges and ranges[0][0] == meta["revision"] + 1
    proc, result = cluster.replay(chunks)
    assert proc.returncode == 0, proc.stderr.decode()
    assert result["revision"] == target and result["replayed"] == target - meta["revision"], result
    assert {k: result[k] for k in ("keys", "hashkv")} == cluster.contents(target)
    assert result["checked_revision"] is not None, "the archiver recorded a check the replay compared"
    replayed = subprocess.run(["etcdctl", "snapshot", "status", "-w", "json", "/dev/stdin"], input=proc.stdout,
                              capture_output=True, check=False)
    if replayed.returncode == 0:  # etcdctl 3.4 reads a file; newer ones send this to etcdutl
        assert json.loads(replayed.stdout)["revision"] == target


def test_a_replay_in_a_folder_deeper_than_a_socket_path_allows(tmp_path: Path) -> None:
    """The throwaway etcd's socket is reached through its opened folder: a work folder whose path alone is longer
    than the 107 bytes a unix socket's path may have still replays."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with backed_up_cluster(deep) as cluster:
        with cluster.archiving() as archivers:
            cluster.put_all("/deep/", 5, "v", archivers)
        assert len(str(cluster.host.root / "restore" / "verify.12345678" / "kcpverify:0")) > 107
        proc, result = cluster.replay(sorted(cluster.deltas.glob("*.delta")))
        assert proc.returncode == 0, proc.stderr.decode()
        assert result["revision"] == cluster.revision(), result


def test_a_replay_until_a_revision_stops_exactly_there(cluster: Cluster) -> None:
    with cluster.archiving() as archivers:
        write_everything(cluster)
        middle = cluster.revision() - 8
        cluster.wait_archived(cluster.revision(), archivers)
    proc, result = cluster.replay(sorted(cluster.deltas.glob("*.delta")), until=middle)
    assert proc.returncode == 0, proc.stderr.decode()
    assert result["revision"] == middle and result["keys"] == cluster.contents(middle)["keys"], result
    assert result["hashkv"] == cluster.contents(middle)["hashkv"]


def test_a_chain_with_a_missing_chunk_is_refused(cluster: Cluster) -> None:
    with cluster.archiving() as archivers:
        for prefix in ("/a/", "/b/", "/c/"):  # a chunk each, at least
            cluster.put_all(prefix, 5, "1", archivers)
    chunks = sorted(cluster.deltas.glob("*.delta"))
    assert len(chunks) >= 3
    proc, result = cluster.replay([chunks[0], *chunks[2:]])
    assert proc.returncode == 1 and not proc.stdout and result == {}
    assert b"the chain breaks" in proc.stderr, proc.stderr.decode()


def newest_check(cluster: Cluster) -> dict[str, int] | None:
    """The check the newest chunk carries, if any."""
    newest = max(cluster.deltas.glob("*.delta"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    return deltalog.decode(newest.read_bytes()).check


def test_a_compaction_after_the_snapshot_still_replays_to_the_recorded_hashkv(cluster: Cluster) -> None:
    """The live hashkv covers the revisions after the live compaction point, which the snapshot does not know of:
    the replay compacts there before it compares."""
    with cluster.archiving() as archivers:
        cluster.put_all("/a/", 5, "1", archivers)
        compacted = cluster.revision() - 2
        cluster.ctl("compact", str(compacted))
        cluster.put_all("/a/", 5, "2", archivers)  # the same keys again: the compaction dropped older revisions
        # The archiver spends at most a tenth of its time on checks: on a busy machine the last chunk may carry
        # none. Write on until the newest chunk carries one, taken after the compaction.
        deadline = time.monotonic() + 30
        while ((newest := newest_check(cluster)) or {}).get("revision", 0) <= compacted + 2:
            assert time.monotonic() < deadline, f"no check recorded after the compaction: {newest}"
            time.sleep(0.5)
            cluster.put_all("/a/", 1, "3", archivers)
    proc, result = cluster.replay(sorted(cluster.deltas.glob("*.delta")))
    assert proc.returncode == 0, proc.stderr.decode()
    assert result["checked_revision"] == result["revision"] == cluster.revision(), result


def test_a_chunk_that_replays_to_other_data_than_recorded_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """A value changed in the chunk: the archiver's recorded hashkv no longer matches the replay."""
    with cluster.archiving() as archivers:
        cluster.put_all("/a/", 5, "right", archivers)
    (chunk,) = sorted(cluster.deltas.glob("*.delta"))
    wrong = base64.b64encode(b"wrong").decode()
    forged = tmp_path / "forged.delta"
    forged.write_bytes(chunk.read_bytes().replace(base64.b64encode(b"right").decode().encode(), wrong.encode()))
    proc, _ = cluster.replay([forged])
    assert proc.returncode == 1 and not proc.stdout
    assert b"the replay differs from the live cluster" in proc.stderr, proc.stderr.decode()


def test_two_archivers_at_once_still_leave_one_chain_with_no_gap_and_no_overlap(cluster: Cluster) -> None:
    """What a leader change can cause for a moment: the backup host refuses the chunk that repeats revisions and
    the refused archiver resumes where the chain ends."""
    with cluster.archiving(2) as archivers:
        for i in range(40):
            cluster.ctl("put", f"/both/{i}", str(i))
            time.sleep(0.05)
        target = cluster.revision()
        cluster.wait_archived(target, archivers)
    _, meta = cluster.snapshot()
    ranges = [tuple(int(n) for n in p.stem.split("-")) for p in cluster.deltas.glob("*.delta")]
    assert deltalog.chain(ranges, after=meta["revision"], until=target)
    proc, result = cluster.replay(sorted(cluster.deltas.glob("*.delta")))
    assert proc.returncode == 0 and result["revision"] == target, proc.stderr.decode()


def test_uploads_slower_than_the_interval_make_larger_chunks_not_a_backlog(cluster: Cluster) -> None:
    """Each upload takes 3 s, the interval is 1 s: the chunk after an upload carries every revision seen during it.
    (Each chunk used to carry one revision once an upload outlasted the interval, and the archive fell behind the
    writes for as long as they went on.)"""
    ssh = cluster.host.root / "bin" / "ssh"
    ssh.rename(ssh.with_name("ssh-fast"))
    ssh.write_text(f"#!/bin/sh\nsleep {SLOW_UPLOAD_SECONDS}\nexec {ssh.with_name('ssh-fast')} \"$@\"\n")
    ssh.chmod(0o755)
    with cluster.archiving() as archivers:
        started = time.monotonic()
        while time.monotonic() - started < 4 * SLOW_UPLOAD_SECONDS:  # writes all along
            cluster.ctl("put", "/steady", str(time.monotonic()))
        last, written = cluster.revision(), time.monotonic()
        cluster.wait_archived(last, archivers)
        behind = time.monotonic() - written
    sizes = [len(deltalog.decode(c.read_bytes()).revisions) for c in sorted(cluster.deltas.glob("*.delta"))]
    print(f"chunks of {sizes} revisions; the last write archived {behind:.1f} s after it")
    assert behind <= 2 * (1 + SLOW_UPLOAD_SECONDS) + 2, f"archived {behind:.1f} s after the last write; chunks {sizes}"
    assert len(sizes) <= 4 + 3, f"{len(sizes)} chunks for {4 * SLOW_UPLOAD_SECONDS} s of writes: {sizes}"


@pytest.mark.parametrize(("seen", "archived", "snapshots", "expected"), [
    ([(0.0, 100), (200.0, 150), (400.0, 300)], 400, [50], 150),  # 5 minutes ago: 150; archived past it
    ([(0.0, 100), (200.0, 150), (400.0, 300)], 120, [50], 120),  # held behind the archive
    ([(0.0, 100), (200.0, 150), (400.0, 300)], 120, [140], 140),  # ... unless a kept snapshot holds more
    ([(300.0, 100)], 400, [], 0),  # nothing is 5 minutes old yet
])
def test_compaction_keeps_five_minutes_and_never_passes_what_a_restore_needs(
        seen: list[tuple[float, int]], archived: int, snapshots: list[int], expected: int) -> None:
    assert COMPACT_EVERY_SECONDS == 300
    assert compaction_target(seen, 500.0, archived, snapshots) == expected
