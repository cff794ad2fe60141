"""The delta log on the deployed local cluster: under continuous writes every member dies at once at a random moment
(etcd and the archiver killed, the data gone), then `scripts/etcd-restore` brings back the newest snapshot plus the
archived revisions. No acknowledged write older than `backup.deltaSeconds + 2 s` before the kill may be missing.

The tests run in file order and build on each other: the loss and restore, then a point-in-time restore to a
revision of that history, then a chain with a chunk missing. Last, the delta log in S3 (moto's stand-in): the
agent's archiver run against a bucket as a cloud member runs it, and restores from the bucket, and from the same
snapshot and log copied into GCS (tests/gcs.py's stand-in, read through this machine's `gcloud`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kcp_host import deltalog
from tests.figures import record
from tests.gcs import BUCKET as GCS_BUCKET
from tests.gcs import ENDPOINT as GCS_ENDPOINT
from tests.gcs import emulated_gcs, upload
from tests.integration.conftest import Deployment
from tests.integration.test_backup_restore import (
    BUCKET,
    S3_DELTA_SECONDS,
    acked,
    backup_dir,
    backup_to_s3,
    cluster_state,
    etcd_restore,
    lose_every_members_data,
    run_backup_everywhere,
    s3,  # noqa: F401 (moto's S3, a module fixture here too)
    s3_agent,
    s3api,
)
from tests.integration.test_load_balancer_failover import start_writer
from tests.integration.test_self_healing import leader

pytestmark = pytest.mark.integration
REVISION_BUMP = 1_000_000_000
state: dict[str, Any] = {}


def delta_seconds(dep: Deployment) -> int:
    return int(dep.config.get("backup", {}).get("deltaSeconds", 10))


def chunks(dep: Deployment, folder: str = "deltas") -> list[tuple[int, int]]:
    out = dep.sandbox.ssh(dep.backup_host, f"ls {backup_dir(dep)}/{folder}/ 2>/dev/null; true").stdout.decode()
    return sorted(tuple(int(n) for n in name.removesuffix(".delta").split("-"))  # type: ignore[misc]
                  for name in out.split() if name.endswith(".delta"))


def test_the_archiver_runs_on_every_member_and_only_the_leader_archives(local_cluster: Deployment) -> None:
    dep = local_cluster
    for m in dep.members:
        active = dep.sandbox.ssh(m, "systemctl is-active etcd-delta-archive.service", check=False).stdout.strip()
        assert active == b"active", f"{m}: etcd-delta-archive.service is {active!r}"
    state["snapshot"] = run_backup_everywhere(dep)
    dep.etcdctl(dep.members[0], "put", "/delta/first", "1")
    deadline = time.monotonic() + 3 * delta_seconds(dep) + 10
    while not chunks(dep):
        assert time.monotonic() < deadline, "no chunk reached the backup host"
        time.sleep(0.5)
    journals = {m: dep.sandbox.ssh(m, "journalctl -u etcd-delta-archive -o cat --no-pager", check=False)
                .stdout.decode() for m in dep.members}
    leading = [m for m, text in journals.items() if "leader: archiving from revision" in text]
    assert len(leading) >= 1, journals
    status = json.loads(dep.sandbox.ssh(dep.backup_host, f"cat {backup_dir(dep)}/status.json").stdout)
    assert status["last_delta_revision"] >= state["snapshot"]["revision"] + 1, status


def kill_every_member(dep: Deployment) -> float:
    """etcd and the archiver SIGKILLed on every member at once, then their data removed: a loss of every machine.
    Returns the moment the kills were sent (the test machine's clock, which the test hosts share)."""
    command = (". /etc/etcd/cluster.env; systemctl kill -s KILL etcd.service etcd-delta-archive.service; "
               "systemctl stop --no-block etcd.service etcd-delta-archive.service; systemctl kill -s KILL "
               "etcd.service etcd-delta-archive.service")
    with ThreadPoolExecutor(len(dep.members)) as pool:
        at = time.time()
        list(pool.map(lambda m: dep.sandbox.ssh(m, command), dep.members))
    for m in dep.members:  # stopped for good (Sandbox.stop_unit), data gone
        for unit in ("etcd.service", "etcd-delta-archive.service"):
            dep.sandbox.stop_unit(m, unit)
        dep.sandbox.ssh(m, '. /etc/etcd/cluster.env; rm -rf "$KCP_DATA_DIR"')
    return at


def test_every_member_killed_under_writes_loses_no_write_older_than_the_delta_interval(
        local_cluster: Deployment) -> None:
    dep = local_cluster
    bound = delta_seconds(dep) + 2
    writer = start_writer(dep, "delta-rpo", dep.client_endpoints, seconds=120)
    moment = random.uniform(2 * bound, 3 * bound)
    print(f"\nkilling every member {moment:.1f} s into the writes")
    time.sleep(moment)
    killed_at = kill_every_member(dep)
    writer.proc.terminate()
    writer.proc.wait(timeout=30)
    acks = [a for a in writer.acks() if a["t"] <= killed_at]
    proc = etcd_restore(dep)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(proc.stderr.strip().splitlines()[-1])
    held = acked(dep, writer.prefix)
    lost = [a for a in acks if held.get(a["key"]) != a["value"]]
    kept = [a for a in acks if held.get(a["key"]) == a["value"]]
    too_old = [a for a in lost if a["t"] < killed_at - bound]
    rpo = killed_at - max((a["t"] for a in kept), default=killed_at)
    print(f"{len(acks)} writes acknowledged before the kill, {len(lost)} lost; observed RPO {rpo:.2f} s (bound "
          f"{bound} s); RTO with deltas {report['rto_seconds']:.2f} s; deltas {report['deltas']}")
    record("delta log RPO: every member killed under writes (acknowledged writes lost, newest kept)", rpo,
           "backup.deltaSeconds + 2 s", bound, f"<= {bound} s")
    record("restore RTO with the delta log replayed (snapshot + archived revisions onto 3 members)",
           report["rto_seconds"], "its replay into a throwaway etcd on one member", report["deltas"]["replay_seconds"])
    assert not too_old, f"{len(too_old)} acknowledged writes older than {bound} s before the kill are missing, " \
                        f"e.g. {too_old[:3]}"
    assert rpo <= bound
    assert report["deltas"] and report["deltas"]["last_revision"] == report["revision"], report
    assert report["restored_revision"] == report["revision"] + REVISION_BUMP
    assert not [a for a in kept if a["revision"] > report["revision"]], "a write newer than the restored point"
    # The restored cluster is a new history: its delta log starts anew, the old one is kept aside.
    state["aside"] = f"deltas.before-{report['token']}"
    assert chunks(dep, state["aside"]) and not chunks(dep)
    state["acks"], state["prefix"] = acks, writer.prefix


def test_a_point_in_time_restore_lands_exactly_on_the_requested_revision(local_cluster: Deployment) -> None:
    dep = local_cluster
    acks = state["acks"]
    target = acks[len(acks) // 2]["revision"]
    report = restored_exactly_at(dep, acks, target, state["prefix"], "--delta-log", state["aside"])
    assert report["restored_revision"] == target + REVISION_BUMP, report


def test_a_chain_with_a_missing_chunk_is_refused_and_the_cluster_untouched(local_cluster: Deployment) -> None:
    dep = local_cluster
    target = state["acks"][-1]["revision"]
    chain = [c for c in chunks(dep, state["aside"]) if c[0] <= target and c[1] > state["snapshot"]["revision"]]
    assert len(chain) >= 3, chain
    first, last = chain[len(chain) // 2]
    name = f"{backup_dir(dep)}/{state['aside']}/{first:016d}-{last:016d}"
    dep.sandbox.ssh(dep.backup_host, f"mv {name}.delta /root/aside.delta")
    before = cluster_state(dep)
    try:
        proc = etcd_restore(dep, "--until", str(target), "--delta-log", state["aside"], "--force")
    finally:
        dep.sandbox.ssh(dep.backup_host, f"mv /root/aside.delta {name}.delta")
    # The restore starts from the newest snapshot at or before the target, which the backup timer may have taken
    # after state["snapshot"] (in one CI run, right before the chunk taken away): the chain from it then has a gap,
    # or ends where that chunk began.
    broken = "gap" in proc.stderr or f"revision {target} is not archived: the chain from" in proc.stderr
    assert proc.returncode == 1 and broken and "nothing was changed" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before, "a refused restore must leave the cluster as it was"


def s3_chunks(env: dict[str, str], history: str) -> dict[str, list[str]]:
    """Every key under the delta log of cluster `history`, with its version IDs."""
    versions: dict[str, list[str]] = {}
    for v in s3api(env, "list-object-versions", "--prefix", f"local/deltas/{history}/").get("Versions", []):
        versions.setdefault(v["Key"], []).append(v["VersionId"])
    return versions


def archiver_journal(tmp_path: Path) -> str:
    """What the two archivers of the S3 test logged so far."""
    return "".join((tmp_path / f"archiver-{n}.log").read_text() for n in range(2))


def test_the_delta_log_in_s3_keeps_every_write_and_restores_any_revision(
        local_cluster: Deployment, tmp_path: Path, s3: dict[str, str]) -> None:  # noqa: F811 (the imported fixture)
    """The archiver with an s3:// destination, as a cloud member runs it: two at once for a while (a leader change
    seen late), one of them killed with the writes; every member's data lost; the restore from the bucket replays
    the chain onto the snapshot. Then a point-in-time restore, and a forged overlapping chunk refused."""
    dep = local_cluster
    lead = leader(dep, dep.members)
    work = tmp_path / "s3-deltas"
    snapshot = backup_to_s3(dep, s3, work, lead)
    history = snapshot["cluster_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", history), snapshot
    bound = S3_DELTA_SECONDS + 2
    writer = start_writer(dep, "s3-deltas", dep.client_endpoints, seconds=120)
    logs = [(tmp_path / f"archiver-{n}.log").open("wb") for n in range(2)]
    archivers = [subprocess.Popen(s3_agent(dep, s3, work, lead, "etcd-delta-archive"), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True) for log in logs]
    try:
        # Two archivers ship at once until the bucket refuses one of them a chunk (it takes one per first revision):
        # a fixed wait of 6 s saw neither ship in one CI run on a slow day.
        deadline = time.monotonic() + 60
        while "refused" not in archiver_journal(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_group(archivers[0])
        # The one left takes over (after a refusal: list and head the log, then an interval and an upload, about
        # 6 s here); the RPO is measured once it ships on its own, at a random point of its cycle.
        shipped = len(s3_chunks(s3, history))
        deadline = time.monotonic() + 60
        while len(s3_chunks(s3, history)) <= shipped:
            assert time.monotonic() < deadline and archivers[1].poll() is None, "the archiver left shipped nothing"
            time.sleep(0.5)
        time.sleep(random.uniform(0, S3_DELTA_SECONDS + 2))
        killed_at = time.time()
        kill_group(archivers[1])
        writer.proc.terminate()
        writer.proc.wait(timeout=30)
    finally:
        for archiver in archivers:
            kill_group(archiver)
            archiver.wait()
    journal = archiver_journal(tmp_path)
    print(f"\n{journal[-1500:]}")
    assert "refused" in journal, "the two archivers never met at one revision: the test did not test that"
    keys = s3_chunks(s3, history)
    assert keys and all(len(ids) == 1 and re.fullmatch(r"local/deltas/[0-9a-f]{16}/[0-9]{16}\.delta", key)
                        for key, ids in keys.items()), keys
    acks = [a for a in writer.acks() if a["t"] <= killed_at]
    lose_every_members_data(dep)
    proc = etcd_restore(dep, "--bucket", f"s3://{BUCKET}/local", env=s3)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    deltas = report["deltas"]
    print(proc.stderr.strip().splitlines()[-1])
    held = acked(dep, writer.prefix)
    kept = [a for a in acks if held.get(a["key"]) == a["value"]]
    too_old = [a for a in acks if held.get(a["key"]) != a["value"] and a["t"] < killed_at - bound]
    rpo = killed_at - max((a["t"] for a in kept), default=killed_at)
    print(f"S3: {len(acks)} writes acknowledged before the kill, {len(acks) - len(kept)} lost; observed RPO "
          f"{rpo:.2f} s (bound {bound} s); RTO with deltas {report['rto_seconds']:.2f} s; {deltas['revisions']} "
          f"revisions from {deltas['chunks']} chunks of {len(keys)} in the bucket")
    record("delta log in S3 (moto stand-in): RPO when the archiver dies under writes", rpo,
           "KCP_BACKUP_DELTA_SECONDS + 2 s", bound, f"<= {bound} s")
    assert not too_old, f"{len(too_old)} acknowledged writes older than {bound} s are missing, e.g. {too_old[:3]}"
    assert (report["base_snapshot"], deltas["first_revision"], deltas["last_revision"]) == \
        (snapshot["name"], snapshot["revision"] + 1, report["revision"]), report
    assert not [a for a in kept if a["revision"] > report["revision"]], "a write newer than the restored point"

    restored_exactly_at(dep, acks, acks[len(acks) // 2]["revision"], writer.prefix,
                        "--bucket", f"s3://{BUCKET}/local", env=s3)

    # From files the operator downloaded (--snapshot-file, --delta-dir): the snapshot and its cluster's log.
    download = tmp_path / "download"
    download.mkdir()
    for suffix in (".db", ".json"):
        got = s3api(s3, "get-object", "--key", f"local/snapshots/{snapshot['name']}{suffix}",
                    str(download / f"s{suffix}"))
        assert isinstance(got, dict), got
    subprocess.run(["aws", "s3", "cp", "--recursive", "--only-show-errors", f"s3://{BUCKET}/local/deltas/{history}/",
                    str(download / history)], env=s3, check=True)
    restored_exactly_at(dep, acks, acks[len(acks) // 3]["revision"], writer.prefix, "--snapshot-file",
                        str(download / "s.db"), "--metadata", str(download / "s.json"), "--delta-dir",
                        str(download / history), env=s3)

    # From GCS, through this machine's `gcloud` against tests/gcs.py's emulator: the same snapshot and log, with the
    # object metadata etcd-backup and the archiver give them there as in S3 (both write object_metadata's).
    with emulated_gcs(tmp_path / "gcloud") as gcs:
        for key in (f"local/snapshots/{snapshot['name']}.db", *sorted(keys)):
            upload(gcs[GCS_ENDPOINT], key, s3_object(s3, key), s3api(s3, "head-object", "--key", key)["Metadata"])
        from_gcs = restored_exactly_at(dep, acks, acks[2 * len(acks) // 3]["revision"], writer.prefix,
                                       "--bucket", f"gs://{GCS_BUCKET}/local", env={**s3, **gcs})
    print(f"GCS (emulator): restored at revision {from_gcs['revision']} from {from_gcs['deltas']['chunks']} chunks "
          f"onto {from_gcs['base_snapshot']}; RTO {from_gcs['rto_seconds']:.2f} s")
    assert from_gcs["base_snapshot"] == snapshot["name"] and from_gcs["deltas"]["chunks"] >= 1, from_gcs

    # A chunk that starts inside another one (its name is new, so the bucket takes it): the restore refuses the chain.
    chunk = next(c for k in sorted(keys) if len((c := deltalog.decode(s3_object(s3, k))).revisions) > 1)
    forged = deltalog.Chunk(chunk.cluster, chunk.member, chunk.closed_at, chunk.revisions[1:]).encode()
    (tmp_path / "forged").write_bytes(forged)
    key = f"local/deltas/{history}/{deltalog.bucket_chunk_name(chunk.first + 1)}"
    put = s3api(s3, "put-object", "--key", key, "--body", str(tmp_path / "forged"), "--checksum-algorithm", "CRC32")
    assert isinstance(put, dict), put
    before = cluster_state(dep)
    proc = etcd_restore(dep, "--bucket", f"s3://{BUCKET}/local", "--force", env=s3)
    assert proc.returncode != 0 and "overlap" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before, "a refused restore changed the cluster"


def restored_exactly_at(dep: Deployment, acks: list[dict[str, Any]], target: int, prefix: str, *source: str,
                        env: dict[str, str] | None = None) -> dict[str, Any]:
    """A point-in-time restore (`--until target --force`) from `source`: every write up to it is back, none after.
    Returns the restore's report."""
    proc = etcd_restore(dep, *source, "--until", str(target), "--force", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["revision"] == target, report
    held = acked(dep, prefix)
    assert all(held.get(a["key"]) == a["value"] for a in acks if a["revision"] <= target), "a write up to it is missing"
    assert not [a for a in acks if a["revision"] > target and a["key"] in held], "a write after it came back"
    return report


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """An archiver with its `etcdctl watch` and any upload under way, as systemd stops the unit's whole cgroup."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def s3_object(env: dict[str, str], key: str) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        got = s3api(env, "get-object", "--key", key, f"{scratch}/object")
        assert isinstance(got, dict), got
        return Path(f"{scratch}/object").read_bytes()
