"""Self-healing etcd on real hosts, under a write load that records every acknowledged write.

Each fault runs while tests/integration/writeload.py puts sequential keys through every
member's client URL (from the backup host's network namespace, which the firewall lets
reach etcd). After each fault: every member is a started, promoted, healthy voter, all
members hash their key space alike at one revision (`endpoint hashkv`), and every key
the writer saw acknowledged is there with its value. Figures (tests/figures.py) are for
this local test bed: the write gap after leader loss and the time for a replacement
member to be promoted. Tests share one cluster and run in file order.
"""

from __future__ import annotations

import base64
import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.figures import record
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration

WRITELOAD = Path(__file__).with_name("writeload.py")
AGENT = "/usr/local/lib/kcp/kcp-host"
REPLACEMENT_LIMIT_S = 30.0


# ----- etcd through a host's own member certificate ------------------------------------

def url(cluster: Deployment, host: str) -> str:
    return f"https://{cluster.sandbox.address(host)}:2379"


def ctl(cluster: Deployment, via: str, hosts: list[str], *args: str, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """etcdctl on `via` against exactly the client URLs of `hosts`."""
    endpoints = ",".join(url(cluster, h) for h in hosts)
    command = (". /etc/etcd/cluster.env && ETCDCTL_API=3 etcdctl --endpoints=" + endpoints
               + ' --cacert="$KCP_ETCD_CA" --cert="$KCP_ETCD_CERT" --key="$KCP_ETCD_KEY" '
               + " ".join(shlex.quote(a) for a in args))
    return cluster.sandbox.ssh(via, command, timeout=timeout, check=check)


def ctl_json(cluster: Deployment, via: str, hosts: list[str], *args: str) -> Any:
    return json.loads(ctl(cluster, via, hosts, *args, "-w", "json").stdout)


def member_list(cluster: Deployment, via: str, hosts: list[str]) -> list[dict[str, Any]]:
    return ctl_json(cluster, via, hosts, "member", "list")["members"]


def leader(cluster: Deployment, hosts: list[str]) -> str:
    for entry in ctl_json(cluster, hosts[0], hosts, "endpoint", "status"):
        status = entry["Status"]
        if status["header"]["member_id"] == status["leader"]:
            return next(h for h in hosts if url(cluster, h) == entry["Endpoint"])
    raise AssertionError(f"no leader among {hosts}")


def wait_promoted_and_healthy(cluster: Deployment, hosts: list[str], timeout: float = 120) -> float:
    """Seconds until the member list is exactly `hosts`, all started voters, all healthy."""
    start, last = time.monotonic(), "nothing yet"
    while time.monotonic() - start < timeout:
        for via in hosts:
            try:
                members = member_list(cluster, via, hosts)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as err:
                last = f"member list via {via}: {err}"
                continue
            view = sorted((m.get("name", ""), bool(m.get("isLearner")), bool(m.get("clientURLs"))) for m in members)
            last = f"members {view}"
            if view == sorted((h, False, True) for h in hosts) and ctl(
                    cluster, via, hosts, "endpoint", "health", check=False).returncode == 0:
                return time.monotonic() - start
            break
        time.sleep(0.5)
    journals = {h: cluster.sandbox.ssh(h, "journalctl -u etcd-member-promote.service -u etcd.service -o cat -n 15 "
                                          "| grep -E 'etcd-member|promote'", check=False).stdout.decode()
                for h in hosts}
    raise AssertionError(f"{hosts} not all promoted and healthy within {timeout}s; last: {last}; journals: {journals}")


def assert_hashkv_equal(cluster: Deployment, hosts: list[str], timeout: float = 30) -> None:
    """One revision, one hash on every member: their key spaces are identical."""
    rev = str(ctl_json(cluster, hosts[0], hosts, "get", "kcp-test/probe")["header"]["revision"])
    deadline, hashes = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        out = ctl(cluster, hosts[0], hosts, "endpoint", "hashkv", "--rev", rev, "-w", "json", check=False)
        if out.returncode == 0:
            hashes = {e["Endpoint"]: e["HashKV"]["hash"] for e in json.loads(out.stdout)}
            if len(hashes) == len(hosts) and len(set(hashes.values())) == 1:
                return
        time.sleep(1)
    raise AssertionError(f"hashkv at revision {rev} differs or is missing: {hashes}")


# ----- the write load -------------------------------------------------------------------

@dataclass
class Load:
    proc: subprocess.Popen[bytes]
    log: Path
    prefix: str

    def stop(self) -> list[dict[str, Any]]:
        """End the writer (SIGTERM: after the write in flight) and return its acknowledged writes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return self.acks()

    def acks(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


def start_load(cluster: Deployment, name: str, seconds: float = 240, request_timeout: float = 0.5) -> Load:
    """The writer in the backup host's namespace, through every member's client URL; it tries the next member after
    `request_timeout` without an answer."""
    ca, cert, key = cluster.client_tls
    log = cluster.workdir / f"acks-{name}.jsonl"
    log.unlink(missing_ok=True)
    prefix = f"kcp-test/{name}/"
    argv = ["ip", "netns", "exec", cluster.sandbox.netns(cluster.backup_host), sys.executable, str(WRITELOAD),
            "--endpoints", ",".join(cluster.client_endpoints), "--cacert", str(ca), "--cert", str(cert),
            "--key", str(key), "--prefix", prefix, "--count", "100000", "--seconds", str(seconds),
            "--interval", "0.01", "--timeout", str(request_timeout), "--out", str(log)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = Load(proc, log, prefix)
    deadline = time.monotonic() + 30
    while len(load.acks()) < 20:
        assert proc.poll() is None, f"the writer exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "the writer got no 20 acknowledged writes in 30 s"
        time.sleep(0.2)
    return load


def assert_acked_writes_present(cluster: Deployment, hosts: list[str], load: Load,
                                acks: list[dict[str, Any]]) -> None:
    stored = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
              for kv in ctl_json(cluster, hosts[0], hosts, "get", "--prefix", load.prefix).get("kvs", [])}
    missing = [a["key"] for a in acks if stored.get(a["key"]) != a["value"]]
    assert not missing, f"{len(missing)} of {len(acks)} acknowledged writes missing, first {missing[:5]}"


@contextmanager
def under_load(cluster: Deployment, name: str, hosts: list[str], request_timeout: float = 0.5) -> Iterator[Load]:
    """Run a fault under load, then check health, hashkv and every acknowledged write."""
    load = start_load(cluster, name, request_timeout=request_timeout)
    try:
        yield load
        wait_promoted_and_healthy(cluster, hosts)
        time.sleep(2)  # writes resume through the healed member too
    finally:
        acks = load.stop()
    assert len(acks) >= 20, f"only {len(acks)} writes acknowledged"
    assert_hashkv_equal(cluster, hosts)
    assert_acked_writes_present(cluster, hosts, load, acks)


def longest_stall_after(acks: list[dict[str, Any]], fault_at: float, window: float = 30) -> float:
    """The longest time without an acknowledged write, counted from the fault on."""
    gap, previous = 0.0, fault_at
    for t in sorted(a["t"] for a in acks):
        if t <= fault_at:
            continue
        if t - fault_at > window:
            break
        gap, previous = max(gap, t - previous), t
    return gap


def election_timeout_s(cluster: Deployment) -> float:
    return cluster.config["etcd"]["electionMs"] / 1000


def recovery_journal(cluster: Deployment, host: str, since: float) -> str:
    """What the recovery and promote programs logged on `host` since `since` (epoch seconds)."""
    out = cluster.sandbox.ssh(host, f"journalctl -b --since @{int(since) - 1} -u etcd.service "
                                    "-u etcd-member-promote.service -o cat | grep -E 'etcd-member-(recovery|promote)'",
                              check=False)
    return out.stdout.decode()


# ----- faults -----------------------------------------------------------------------------

def test_cluster_starts_whole_and_every_member_records_its_id(local_cluster: Deployment) -> None:
    hosts = local_cluster.members
    wait_promoted_and_healthy(local_cluster, hosts)
    for host in hosts:
        recorded = local_cluster.sandbox.ssh(host, "cat /var/lib/etcd/data/member/kcp-member-id").stdout.decode()
        listed = {m["name"]: m["ID"] for m in member_list(local_cluster, host, hosts)}
        assert int(recorded.strip(), 16) == listed[host], f"{host} recorded {recorded!r}, list says {listed}"


def test_killed_follower_restarts_on_its_own_data(local_cluster: Deployment) -> None:
    since = time.time()
    hosts = local_cluster.members
    with under_load(local_cluster, "follower-kill", hosts):
        follower = next(h for h in hosts if h != leader(local_cluster, hosts))
        ids_before = {m["ID"] for m in member_list(local_cluster, hosts[0], hosts)}
        local_cluster.sandbox.kill_process(follower, "etcd.service")
        time.sleep(7)  # RestartSec=5s, then etcd-member-recovery decides
    assert {m["ID"] for m in member_list(local_cluster, hosts[0], hosts)} == ids_before, \
        "a follower with intact data must come back as the same member"
    assert "local data of a current member" in recovery_journal(local_cluster, follower, since)


KILLS = 3  # etcd draws each follower's election timeout from [T, 2T): one kill is one draw
# A put that a follower forwarded to the leader just killed is lost; the writer waits this long before it tries the
# next member. With 0.5 s, nine kills on the local test bed measured gaps 0.06-0.46 s longer than etcd took to elect
# a leader (1.06-1.75 s, from its journal): the writer's own wait, not the cluster's. Puts take ~0.02 s here.
KILL_REQUEST_TIMEOUT = 0.2


def elected_after(cluster: Deployment, hosts: list[str], at: float) -> float | None:
    """Seconds from `at` until a member's etcd logged that it became leader (journal time, the same clock)."""
    times = []
    for host in hosts:
        out = cluster.sandbox.ssh(host, f"journalctl -u etcd -o short-unix --no-pager --since @{int(at)} "
                                        "| grep 'became leader at term'", check=False).stdout.decode()
        times += [float(line.split()[0]) for line in out.splitlines()]
    return min((t - at for t in times if t > at), default=None)


def test_killed_leader_write_gap_is_within_two_election_timeouts(local_cluster: Deployment) -> None:
    """The median gap of three leader kills, each once the cluster is whole again: a single kill measures the
    random draw of one election timeout as much as the cluster (one was seen at 2.18 s, others at ~1.1 s)."""
    hosts, kills = local_cluster.members, []
    with under_load(local_cluster, "leader-kill", hosts, request_timeout=KILL_REQUEST_TIMEOUT) as load:
        for _ in range(KILLS):
            wait_promoted_and_healthy(local_cluster, hosts)
            old = leader(local_cluster, hosts)
            kills.append((old, time.time()))
            local_cluster.sandbox.kill_process(old, "etcd.service")
            time.sleep(8)
    election = election_timeout_s(local_cluster)
    gaps = [longest_stall_after(load.acks(), at, window=8) for _, at in kills]
    gap, limit = sorted(gaps)[KILLS // 2], 2 * election
    elected = [elected_after(local_cluster, hosts, at) for _, at in kills]
    each = ", ".join(f"{host} {g:.2f}s (leader elected after {e if e is None else round(e, 2)}s)"
                     for (host, _), g, e in zip(kills, gaps, elected, strict=True))
    print(f"\nwrite gaps after SIGKILL of the leader (writer's request timeout {KILL_REQUEST_TIMEOUT}s): {each}")
    record(f"etcd leader-loss write gap (SIGKILL, median of {KILLS})", gap, "election timeout", election,
           "<= 2x election timeout")
    if None not in elected:
        record(f"etcd leader elected after SIGKILL of the leader (journal, median of {KILLS})",
               sorted(e or 0.0 for e in elected)[KILLS // 2], "election timeout", election)
    assert all(g > 0 for g in gaps) and gap <= limit, f"median write gap after SIGKILL of the leader: {gaps} > {limit}"


def test_partitioned_leader_is_replaced_and_rejoins_after_heal(local_cluster: Deployment) -> None:
    hosts = local_cluster.members
    with under_load(local_cluster, "leader-partition", hosts) as load:
        old = leader(local_cluster, hosts)
        cut_at = time.time()
        local_cluster.sandbox.partition(old)
        try:
            time.sleep(8)
            others = [h for h in hosts if h != old]
            assert leader(local_cluster, others) != old
        finally:
            local_cluster.sandbox.heal(old)
    record("etcd leader-partition write gap", longest_stall_after(load.acks(), cut_at),
           "election timeout", election_timeout_s(local_cluster))


def test_all_members_killed_at_once_restart_on_their_own_data(local_cluster: Deployment) -> None:
    """No quorum while they come back: members with data must just start, not wait for one."""
    since = time.time()
    hosts = local_cluster.members
    with under_load(local_cluster, "all-killed", hosts):
        ids_before = {m["ID"] for m in member_list(local_cluster, hosts[0], hosts)}
        for host in hosts:
            local_cluster.sandbox.kill_process(host, "etcd.service")
        time.sleep(7)
    assert {m["ID"] for m in member_list(local_cluster, hosts[0], hosts)} == ids_before
    for host in hosts:
        assert "decision: start etcd (local data" in recovery_journal(local_cluster, host, since), host


def test_member_with_wiped_data_rejoins_as_learner_and_is_promoted(local_cluster: Deployment) -> None:
    since = time.time()
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    with under_load(local_cluster, "wiped-data", hosts):
        victim = next(h for h in hosts if h != leader(local_cluster, hosts))
        old_id = next(m["ID"] for m in member_list(local_cluster, hosts[0], hosts) if m["name"] == victim)
        sandbox.ssh(victim, "systemctl stop etcd && rm -rf /var/lib/etcd/data")
        sandbox.kill_host(victim)
        started = time.monotonic()
        sandbox.start_host(victim)
        wait_promoted_and_healthy(local_cluster, hosts)
        took = time.monotonic() - started
    new_id = next(m["ID"] for m in member_list(local_cluster, hosts[0], hosts) if m["name"] == victim)
    record("etcd wiped-data member promoted, from reboot", took, "election timeout", election_timeout_s(local_cluster))
    assert new_id != old_id, "an empty data dir must join as a new member, never reuse the old identity"
    assert "decision: replace this member (data: empty)" in recovery_journal(local_cluster, victim, since)


def test_corrupt_data_dir_is_moved_aside_and_member_replaced(local_cluster: Deployment) -> None:
    since = time.time()
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    with under_load(local_cluster, "corrupt-data", hosts):
        victim = next(h for h in hosts if h != leader(local_cluster, hosts))
        sandbox.ssh(victim, "systemctl stop etcd && dd if=/dev/urandom of=/var/lib/etcd/data/member/snap/db "
                            "bs=4096 count=2 conv=notrunc status=none && systemctl start etcd", timeout=120)
    kept = sandbox.ssh(victim, "ls -d /var/lib/etcd/data.bad-db-*", check=False)
    assert kept.returncode == 0, "the corrupt data dir must be kept aside, not deleted"
    assert "decision: replace this member (data: bad-db)" in recovery_journal(local_cluster, victim, since)


def test_interrupted_join_and_stale_learners_are_cleaned_up_on_retry(local_cluster: Deployment) -> None:
    """A learner nobody starts (a foreign leftover, then this host's own from a join that died
    before writing join.env) must not block the next attempt, which must converge."""
    since = time.time()
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    subnet = sandbox.address(hosts[0]).rsplit(".", 1)[0]
    with under_load(local_cluster, "interrupted-join", hosts):
        victim = next(h for h in hosts if h != leader(local_cluster, hosts))
        # etcd adds no member while a voter is down (strict reconfig check), nor for a few
        # seconds after the last change: add the leftover learner first, retrying.
        for _ in range(15):
            if ctl(local_cluster, hosts[0], hosts, "member", "add", "ghost", "--learner",
                   f"--peer-urls=https://{subnet}.99:2380", check=False).returncode == 0:
                break
            time.sleep(1)
        assert any(m.get("isLearner") for m in member_list(local_cluster, hosts[0], hosts)), "ghost not added"
        sandbox.ssh(victim, "systemctl stop etcd && rm -rf /var/lib/etcd/data")
        first = sandbox.ssh(victim, f"{AGENT} etcd-member-recovery", check=False)
        assert first.returncode == 0, first.stderr.decode()
        assert b"stale learner" in first.stderr, first.stderr.decode()
        sandbox.ssh(victim, "rm -f /run/etcd/join.env")  # as if the first run died right after member add
        sandbox.ssh(victim, "systemctl start etcd", timeout=120)
    members = member_list(local_cluster, hosts[0], hosts)
    assert sorted(m.get("name", "") for m in members) == sorted(hosts), f"leftover members: {members}"
    assert "stale member in this host's slot" in recovery_journal(local_cluster, victim, since)


def bare_member_add_and_start(cluster: Deployment, hosts: list[str], victim: str) -> float:
    """Baseline: what an operator does by hand on an already-booted host, timed from
    `member add` to a healthy cluster: remove the member, empty its data, add it back as a
    voter, write the initial-cluster settings, start etcd."""
    others = [h for h in hosts if h != victim]
    cluster.sandbox.ssh(victim, "systemctl stop etcd")
    victim_id = next(m["ID"] for m in member_list(cluster, others[0], others) if m.get("name") == victim)
    ctl(cluster, others[0], others, "member", "remove", format(victim_id, "x"))
    cluster.sandbox.ssh(victim, '. /etc/etcd/cluster.env && mv "$KCP_DATA_DIR" "$KCP_DATA_DIR.baseline-$(date +%s)"')
    peer = f"https://{cluster.sandbox.address(victim)}:2380"
    started = time.monotonic()
    added = ctl(cluster, others[0], others, "member", "add", victim, f"--peer-urls={peer}").stdout.decode()
    join = "".join(f"{line}\n" for line in added.splitlines() if line.startswith("ETCD_INITIAL_CLUSTER"))
    cluster.sandbox.ssh(victim, "mkdir -p /run/etcd && cat > /run/etcd/join.env && systemctl start etcd",
                        input=join.encode(), timeout=120)
    wait_promoted_and_healthy(cluster, hosts)
    return time.monotonic() - started


def test_replacement_host_with_empty_disk_is_promoted_within_30s(local_cluster: Deployment) -> None:
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    with under_load(local_cluster, "replacement-host", hosts):
        victim = next(h for h in hosts if h != leader(local_cluster, hosts))
        sandbox.kill_host(victim)
        started = time.monotonic()
        sandbox.start_host(victim, wipe=True)
        booted = time.monotonic()
        local_cluster.redeploy_host(victim)
        deployed = time.monotonic()
        wait_promoted_and_healthy(local_cluster, hosts)
        done = time.monotonic()
    print(f"\nreplacement: boot {booted - started:.1f}s, redeploy {deployed - booted:.1f}s, "
          f"join+promote {done - deployed:.1f}s")
    assert done - started <= REPLACEMENT_LIMIT_S, f"replacement took {done - started:.1f}s"
    bare = bare_member_add_and_start(local_cluster, hosts, victim)
    record("etcd member replacement, replacement host start to promoted healthy member (boot "
           f"{booted - started:.1f} s, redeploy {deployed - booted:.1f} s, join+promote {done - deployed:.1f} s)",
           done - started, "bare member add + start by hand on a booted host", bare, "<= 30 s")


def test_recovery_refuses_without_quorum_and_changes_nothing(local_cluster: Deployment) -> None:
    hosts, sandbox = local_cluster.members, local_cluster.sandbox
    with under_load(local_cluster, "no-quorum", hosts):
        survivor, down, wiped = hosts[0], hosts[1], hosts[2]
        before = member_list(local_cluster, survivor, [survivor])
        sandbox.ssh(down, "systemctl stop etcd")
        sandbox.ssh(wiped, "systemctl stop etcd && mv /var/lib/etcd/data /var/lib/etcd/kept-by-test")
        refused = sandbox.ssh(wiped, f"{AGENT} etcd-member-recovery", check=False)
        assert refused.returncode == 3, f"rc {refused.returncode}: {refused.stderr.decode()}"
        assert b"scripts/etcd-restore" in refused.stderr, refused.stderr.decode()
        assert sandbox.ssh(wiped, "test ! -e /run/etcd/join.env", check=False).returncode == 0
        sandbox.ssh(down, "systemctl start etcd", timeout=120)  # quorum again: the wiped member may rejoin
        # etcd 3.5 serves the member list only with a quorum (linearizable), so it is compared once the
        # stopped member is back and before the wiped one starts.
        after = member_list(local_cluster, survivor, [survivor, down])
        assert after == before, f"membership changed without quorum: {before} -> {after}"
        sandbox.ssh(wiped, "systemctl start etcd", timeout=120)


def test_spare_takes_over_a_dead_member_and_reports_it(local_cluster: Deployment) -> None:
    """Last: it leaves the cluster as spare + two members, as a real takeover would."""
    since = time.time()
    assert local_cluster.spares, "the local stack has a spare"
    sandbox, spare = local_cluster.sandbox, local_cluster.spares[0]
    dead = local_cluster.members[0]
    after = [*[h for h in local_cluster.members if h != dead], spare]
    with under_load(local_cluster, "spare-takeover", after):
        sandbox.kill_host(dead)
        # The stack's delay (300 s) is too long for a test; a runtime drop-in shortens it here only.
        sandbox.ssh(spare, "mkdir -p /run/systemd/system/etcd-spare-watch.service.d && printf "
                           "'[Service]\\nEnvironment=KCP_SPARE_TAKEOVER_AFTER_SECONDS=10\\n' > "
                           "/run/systemd/system/etcd-spare-watch.service.d/test.conf && systemctl daemon-reload")
        deadline = time.monotonic() + 120
        while sandbox.ssh(spare, "test -e /var/lib/kcp/takeover.json", check=False).returncode != 0:
            assert time.monotonic() < deadline, "no takeover within 120 s"
            sandbox.ssh(spare, "systemctl start etcd-spare-watch.service", check=False, timeout=600)
            time.sleep(3)
    report = json.loads(sandbox.ssh(spare, "cat /var/lib/kcp/takeover.json").stdout)
    assert report["replaced"]["name"] == dead and report["spare"]["name"] == spare, report
    journal = sandbox.ssh(spare, "journalctl -u etcd-spare-watch.service -o cat", check=False).stdout.decode()
    assert f"TAKEOVER: spare {spare}" in journal
    assert sandbox.ssh(spare, "systemctl is-enabled etcd", check=False).stdout.strip() == b"enabled"
    sandbox.start_host(dead)  # the old machine returns with its data: its slot is gone
    time.sleep(3)
    assert "this slot was taken over" in recovery_journal(local_cluster, dead, since)
    assert sorted(m["name"] for m in member_list(local_cluster, after[0], after)) == sorted(after)
