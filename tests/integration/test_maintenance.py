"""etcd maintenance on real hosts: scheduled defragmentation under writes, the quota watch and NOSPACE recovery.

The cluster is the `local` stack (its own deployment). Fragmentation is made by overwriting a few keys with
large values and compacting; the defragmentation then runs as the timer would run it, through
`etcd-maintain.service` on the leader, while tests/integration/writeload.py writes through every member.
For NOSPACE the quota is made small on the test hosts only (TEST-ONLY: etcd.env's
ETCD_QUOTA_BACKEND_BYTES edited on each member, then `kcp-host etcd-rolling-restart`, one member at a time),
the database is pushed past it under the writer, and `scripts/etcd-maintain STACK --nospace` recovers it.
Tests share one cluster and run in file order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.figures import record
from tests.integration.conftest import Deployment
from tests.integration.test_self_healing import (
    AGENT,
    assert_acked_writes_present,
    assert_hashkv_equal,
    ctl,
    election_timeout_s,
    leader,
    longest_stall_after,
    start_load,
    under_load,
    wait_promoted_and_healthy,
)
from tests.program import ROOT

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
TEST_QUOTA = 48 * MIB  # TEST-ONLY: the stack's is 8 GiB
SSH_OPTIONS = ["--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null",
               "--ssh-option", "LogLevel=ERROR"]

# etcdctl on a member host, with its own certificate, against every member.
ETCDCTL = r"""
. /etc/etcd/cluster.env
e() { ETCDCTL_API=3 etcdctl --endpoints="$KCP_CLIENT_ENDPOINTS" --cacert="$KCP_ETCD_CA" --cert="$KCP_ETCD_CERT" \
      --key="$KCP_ETCD_KEY" --command-timeout=60s "$@"; }
"""
# Overwrites 8 keys with 256 KiB values (each put keeps the old revision until a compaction), on the host:
# until a put fails (prints its error), or, with a size given, until a member's database reaches it.
FILL = ETCDCTL + r"""
head -c 196608 /dev/urandom | base64 -w0 > /tmp/fill-value
largest='import json,sys; print(max(s["Status"]["dbSize"] for s in json.load(sys.stdin)))'
target=${1:-0}
for i in $(seq 1 600); do
  if ! out=$(e put "kcp-test/fill/$((i % 8))" < /tmp/fill-value 2>&1); then echo "put $i: $out"; exit 0; fi
  if (( target > 0 && i % 4 == 0 )); then
    size=$(e endpoint status -w json | python3 -c "$largest")
    if (( size >= target )); then echo "size $size after $i puts"; exit 0; fi
  fi
done
echo "600 puts and no stop"; exit 1
"""
# What an operator types without scripts/etcd-maintain (the baseline of the NOSPACE recovery).
BY_HAND = ETCDCTL + r"""
rev=$(e get kcp-test/probe -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
e compact "$rev" --physical && e defrag --cluster && e alarm disarm
"""


def fill(cluster: Deployment, target_bytes: int = 0) -> str:
    host = cluster.members[0]
    return cluster.sandbox.ssh(host, f"bash -s {target_bytes}", input=FILL.encode(), timeout=600).stdout.decode()


def statuses(cluster: Deployment) -> dict[str, dict]:
    hosts = cluster.members
    out = ctl(cluster, hosts[0], hosts, "endpoint", "status", "-w", "json").stdout
    names = {f"https://{cluster.sandbox.address(h)}:2379": h for h in hosts}
    return {names[e["Endpoint"]]: e["Status"] for e in json.loads(out)}


def free_share(status: dict) -> float:
    return (status["dbSize"] - status["dbSizeInUse"]) / status["dbSize"]


def maintain(cluster: Deployment, host: str, *args: str, env: str = "") -> subprocess.CompletedProcess[bytes]:
    return cluster.sandbox.ssh(host, f"{env} {AGENT} etcd-maintain {' '.join(args)}", check=False, timeout=900)


def test_the_maintenance_timer_is_active_on_every_member(local_cluster: Deployment) -> None:
    wait_promoted_and_healthy(local_cluster, local_cluster.members)
    for host in local_cluster.members:
        state = local_cluster.sandbox.ssh(host, "systemctl is-active etcd-maintain.timer", check=False)
        assert state.stdout.strip() == b"active", f"{host}: etcd-maintain.timer is {state.stdout!r}"


def test_defragmentation_is_refused_while_a_member_is_down(local_cluster: Deployment) -> None:
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    chief = leader(local_cluster, hosts)
    down = next(h for h in hosts if h != chief)
    sandbox.ssh(down, "systemctl stop etcd")
    try:
        refused = maintain(local_cluster, chief, "--defrag")
    finally:
        sandbox.ssh(down, "systemctl start etcd", timeout=120)
    assert refused.returncode == 3, refused.stderr.decode()
    assert down in refused.stderr.decode() and b"defragmented in" not in refused.stderr
    wait_promoted_and_healthy(local_cluster, hosts)


def test_scheduled_defragmentation_under_writes_keeps_quorum_and_the_write_gap_small(
        local_cluster: Deployment) -> None:
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    fill(local_cluster, 64 * MIB)
    revision = json.loads(ctl(local_cluster, hosts[0], hosts, "get", "kcp-test/probe", "-w", "json").stdout)
    ctl(local_cluster, hosts[0], hosts, "compact", str(revision["header"]["revision"]), "--physical")
    # A member counts the pages its compaction freed as free only from its next write transaction on, and compacts
    # in the background: a write that reaches it before its compaction ends is not enough, so write every second.
    deadline = time.monotonic() + 30
    while True:
        ctl(local_cluster, hosts[0], hosts, "put", "kcp-test/compacted", "yes")
        before = statuses(local_cluster)
        if all(free_share(s) >= 0.3 for s in before.values()):
            break
        assert time.monotonic() < deadline, f"not fragmented enough: {before}"
        time.sleep(1)
    chief = leader(local_cluster, hosts)
    # TEST-ONLY: the stack's floor (64 MiB free) is above this test's database; a runtime drop-in lowers it.
    sandbox.ssh(chief, "mkdir -p /run/systemd/system/etcd-maintain.service.d && printf '[Service]\\n"
                       "Environment=KCP_DEFRAG_FREE_MIN_MIB=1\\n' > /run/systemd/system/etcd-maintain.service.d/"
                       "test.conf && systemctl daemon-reload")
    with under_load(local_cluster, "defrag", hosts) as load:
        follower = next(h for h in hosts if h != chief)
        assert sandbox.start_unit(follower, "etcd-maintain.service", timeout=900).returncode == 0
        started = time.time()
        run = sandbox.start_unit(chief, "etcd-maintain.service", timeout=900)
        took = time.time() - started
        time.sleep(2)
    journal = sandbox.ssh(chief, "journalctl -u etcd-maintain.service -o cat", check=False).stdout.decode()
    assert run.returncode == 0, journal
    order = [line.split()[2] for line in journal.splitlines() if line.startswith("etcd-maintain: defragmenting ")]
    assert sorted(order) == sorted(hosts) and order[-1] == chief, f"followers first, the leader last: {order}"
    assert "not the leader" in sandbox.ssh(follower, "journalctl -u etcd-maintain.service -o cat").stdout.decode()
    after = statuses(local_cluster)
    assert all(after[h]["dbSize"] < before[h]["dbSize"] / 2 for h in hosts), f"{before} -> {after}"
    election = election_timeout_s(local_cluster)
    gap = longest_stall_after(load.acks(), started, window=took + 2)
    print(f"\ndefragmentation of {len(hosts)} members took {took:.1f}s: "
          + ", ".join(f"{h} {before[h]['dbSize'] / MIB:.1f} -> {after[h]['dbSize'] / MIB:.1f} MiB" for h in hosts))
    record(f"etcd write gap during scheduled defragmentation of every member ({took:.1f} s for "
           f"{len(hosts)} members)", gap, "election timeout", election, "< 2x election timeout")
    assert gap < 2 * election, f"write gap during defragmentation {gap:.2f}s >= {2 * election:.1f}s"


def test_quota_watch_warns_then_nospace_recovery_keeps_every_acknowledged_write(local_cluster: Deployment) -> None:
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    for host in hosts:  # TEST-ONLY quota, one member at a time, each restart only while the rest keep quorum
        sandbox.ssh(host, f"sed -i 's/^ETCD_QUOTA_BACKEND_BYTES=.*/ETCD_QUOTA_BACKEND_BYTES={TEST_QUOTA}/' "
                          f"/etc/etcd/etcd.env && {AGENT} etcd-rolling-restart", timeout=300)
    wait_promoted_and_healthy(local_cluster, hosts)
    print("\n" + fill(local_cluster, int(0.85 * TEST_QUOTA)).strip())
    # The fill stops at the largest database; members' files grow apart (ci31: 37.5, 40.2 and 41.5 MiB), and each
    # member's timer watches its own, so the largest one is the one that must warn.
    sizes = {host: status["dbSize"] for host, status in statuses(local_cluster).items()}
    largest = max(sizes, key=sizes.__getitem__)
    warned = maintain(local_cluster, largest)
    assert warned.returncode == 0 and f"WARNING: database of {largest} is".encode() in warned.stderr, \
        f"{sizes}: {warned.stderr.decode()}"
    load = start_load(local_cluster, "nospace")
    try:
        out = fill(local_cluster)
        assert "database space exceeded" in out, out
        alarms = ctl(local_cluster, hosts[0], hosts, "alarm", "list").stdout.decode()
        assert "NOSPACE" in alarms, alarms
        time.sleep(1)
    finally:
        acks = load.stop()
    assert len(acks) >= 20, f"only {len(acks)} writes acknowledged"
    failed = maintain(local_cluster, leader(local_cluster, hosts))
    assert failed.returncode == 1 and b"NOSPACE" in failed.stderr, failed.stderr.decode()
    started = time.monotonic()
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "etcd-maintain"), str(local_cluster.stack_file),
                             "--nospace", *SSH_OPTIONS], capture_output=True, text=True, timeout=900, check=False)
    took = time.monotonic() - started
    print(script.stdout + script.stderr)
    assert script.returncode == 0, script.stdout + script.stderr
    for step in ("step 2/5: compacting", "step 3/5", "step 4/5: alarm disarm", "OK: NOSPACE cleared"):
        assert step in script.stderr, step
    assert "NOSPACE" not in ctl(local_cluster, hosts[0], hosts, "alarm", "list").stdout.decode()
    ctl(local_cluster, hosts[0], hosts, "put", "kcp-test/after-nospace", "ok")
    assert_acked_writes_present(local_cluster, hosts, load, acks)
    assert_hashkv_equal(local_cluster, hosts)
    print(f"NOSPACE recovery through scripts/etcd-maintain --nospace: {took:.1f}s, {len(acks)} acknowledged "
          "writes from before the alarm all present")
    assert "database space exceeded" in fill(local_cluster)  # the baseline: the same state, recovered by hand
    started = time.monotonic()
    sandbox.ssh(hosts[0], BY_HAND, timeout=600)
    bare = time.monotonic() - started
    record("etcd NOSPACE recovery, scripts/etcd-maintain --nospace (compact, defragment 3 members one at a time "
           "with health checks, disarm, write check)", took,
           "bare etcdctl compact + defrag --cluster + alarm disarm over SSH", bare)
