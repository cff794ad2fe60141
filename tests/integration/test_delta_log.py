"""The delta log on the deployed local cluster: under continuous writes every member dies at once at a random moment
(etcd and the archiver killed, the data gone), then `scripts/etcd-restore` brings back the newest snapshot plus the
archived revisions. No acknowledged write older than `backup.deltaSeconds + 2 s` before the kill may be missing.

The tests run in file order and build on each other: the loss and restore, then a point-in-time restore to a
revision of that history, then a chain with a chunk missing.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.figures import record
from tests.integration.conftest import Deployment
from tests.integration.test_backup_restore import acked, backup_dir, cluster_state, etcd_restore, run_backup_everywhere
from tests.integration.test_load_balancer_failover import start_writer

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
    for m in dep.members:  # stopped for good (the test hosts' shared cgroup tree: Sandbox.stop_unit), data gone
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
    proc = etcd_restore(dep, "--until", str(target), "--delta-log", state["aside"], "--force")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["revision"] == target and report["restored_revision"] == target + REVISION_BUMP, report
    held = acked(dep, state["prefix"])
    assert all(held.get(a["key"]) == a["value"] for a in acks if a["revision"] <= target), "a write up to it is missing"
    assert not [a for a in acks if a["revision"] > target and a["key"] in held], "a write after it came back"


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
    assert proc.returncode == 1 and "gap" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before, "a refused restore must leave the cluster as it was"
