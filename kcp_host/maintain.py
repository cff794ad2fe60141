"""etcd-maintain: defragmentation one member at a time, the quota watch, and NOSPACE recovery.

    kcp-host etcd-maintain              the timer's run on every member: quota watch of the local member;
                                        the leader alone also defragments members above the threshold
    kcp-host etcd-maintain --defrag     every member now, whatever its fragmentation (operator)
    kcp-host etcd-maintain --nospace    compact, defragment, disarm, check a write (operator)
    kcp-host etcd-maintain --status     each voter's size, free share, quota share, leader; alarms (JSON)

Defragmentation blocks the member it runs on, so it runs on one member at a time: followers first, the
leader last, each only while every voter answers a quorum read and while no backup runs (it holds the
backup job's own lock), and the next only once every voter answers again. Exit 0: done or nothing to do;
1: failed (quota at `quota_fail_percent`, an alarm the timer cannot clear, a defrag failed); 2: usage;
3: refused, nothing changed (a voter unhealthy, a backup running). docs/maintenance.md has the rules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kcp_host.contract import ETCD_ENV, BackupEnv, ClusterEnv, ContractError, load_env, parse_env_text
from kcp_host.etcd import Etcdctl, EtcdError, Member
from kcp_host.files import flocked
from kcp_host.log import Abort, log
from kcp_host.membership import ClusterView

REFUSED = 3
MIB = 1024 * 1024
DEFAULT_QUOTA = 2 * 1024**3  # etcd's own when ETCD_QUOTA_BACKEND_BYTES is unset
PROBE_KEY = "kcp/maintenance/probe"
DEFRAG_TIMEOUT = "280s"  # below Etcdctl.run's own 300 s limit; etcd finishes a defrag its client gave up on
HEALTHY_WAIT_SECONDS = 120
T = TypeVar("T")


@dataclass(frozen=True)
class Node:
    """One voter as its `endpoint status` shows it."""

    name: str
    url: str
    db_size: int
    in_use: int
    leader: bool
    revision: int

    @property
    def free(self) -> int:
        return max(0, self.db_size - self.in_use)

    def due(self, free_percent: int, free_min_mib: int) -> bool:
        return self.free * 100 >= free_percent * self.db_size and self.free >= free_min_mib * MIB

    def summary(self, quota: int) -> str:
        share = 100 * self.free / self.db_size if self.db_size else 0
        role = "leader" if self.leader else "follower"
        return (f"{self.name} ({role}): {self.db_size / MIB:.1f} MiB, {share:.0f}% free, "
                f"{100 * self.db_size / quota:.0f}% of the quota")


def defrag_order(nodes: list[Node], free_percent: int | None = None, free_min_mib: int = 0) -> list[Node]:
    """The members to defragment, followers first (by name) and the leader last; every member when
    `free_percent` is None, else those whose free pages reach both thresholds."""
    due = [n for n in nodes if free_percent is None or n.due(free_percent, free_min_mib)]
    return sorted(due, key=lambda n: (n.leader, n.name))


def quota_bytes(etcd_env: str = ETCD_ENV) -> int:
    """etcd's backend quota as etcd.env sets it (etcd's default when unset)."""
    with contextlib.suppress(OSError, ContractError, ValueError):
        raw = parse_env_text(Path(etcd_env).read_text(encoding="utf-8")).get("ETCD_QUOTA_BACKEND_BYTES", "")
        if int(raw) > 0:
            return int(raw)
    return DEFAULT_QUOTA


def backup_lock_path() -> Path:
    try:
        work = load_env(BackupEnv).work_dir
    except ContractError:  # no backup.env here: the default work dir is where a backup would lock
        work = BackupEnv.work_dir
    return Path(work) / ".backup.lock"


@contextlib.contextmanager
def no_backup(lock: Path, wait_seconds: float) -> Iterator[None]:
    """Hold the backup job's own lock: no snapshot runs while a member is defragmented."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(flocked(lock, wait_seconds, "etcd-backup run"))
        except Abort:
            raise Abort(REFUSED, f"a backup is running ({lock} is held after {wait_seconds:.0f}s)") from None
        yield


class Cluster:
    """The voters as the member list names them, probed from this host."""

    def __init__(self, env: ClusterEnv, ctl: Etcdctl) -> None:
        self.env, self.ctl, self.view = env, ctl, ClusterView(env, ctl)

    def endpoints(self) -> list[str]:
        return sorted({*self.env.client_endpoints, self.env.client_url})

    def voters(self) -> list[Member]:
        if not self.view.fetch([*self.view.endpoints(), self.env.client_url]):
            raise Abort(REFUSED, "no member answered the member list")
        return [m for m in self.view.members if not m.learner]

    def _each(self, voters: list[Member], probe: Callable[[str], T]) -> list[T | None]:
        with ThreadPoolExecutor(max_workers=max(1, len(voters))) as pool:
            return list(pool.map(lambda m: probe(m.client_urls[0]) if m.client_urls else None, voters))

    def sick(self) -> list[str]:
        """Voters that do not answer a quorum read through their own URL. Not `endpoint health`: that
        counts any active alarm as unhealthy, and NOSPACE recovery must defragment under one."""
        voters = self.voters()
        answers = self._each(voters, lambda url: self.ctl.run(
            [url], "get", "--keys-only", "--limit=1", PROBE_KEY, dial="1s", timeout="3s", check=False).returncode)
        return [m.name or m.hex_id for m, rc in zip(voters, answers, strict=True) if rc != 0]

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sick := self.sick():
            if time.monotonic() >= deadline:
                raise Abort(1, f"voters not healthy after {timeout:.0f}s: {', '.join(sick)}")
            time.sleep(1)

    def nodes(self) -> list[Node]:
        """Every voter's status; Abort(3) when one does not answer."""
        voters = self.voters()
        statuses = self._each(voters, self.ctl.status)
        missing = [m.name or m.hex_id for m, s in zip(voters, statuses, strict=True) if s is None]
        if missing:
            raise Abort(REFUSED, f"no status from {', '.join(missing)}: not every voter is healthy")
        return [Node(m.name or m.hex_id, m.client_urls[0], int(s["dbSize"]), int(s.get("dbSizeInUse") or s["dbSize"]),
                     s["leader"] == s["header"]["member_id"], int(s["header"]["revision"]))
                for m, s in zip(voters, statuses, strict=True) if s is not None]

    def alarms(self) -> list[str]:
        try:
            listed = self.ctl.run(self.endpoints(), "alarm", "list").stdout
        except EtcdError as error:
            raise Abort(1, f"alarm list: {error}") from None
        return sorted({line.split("alarm:", 1)[1].strip() for line in listed.splitlines() if "alarm:" in line})


def defragment(cluster: Cluster, targets: list[Node], lock: Path, backup_wait: float) -> None:
    for node in targets:
        with no_backup(lock, backup_wait):
            if sick := cluster.sick():
                raise Abort(REFUSED, f"not defragmenting {node.name}: {', '.join(sick)} not healthy")
            log(f"defragmenting {node.name} ({'leader' if node.leader else 'follower'}, "
                f"{node.db_size / MIB:.1f} MiB, {node.free / MIB:.1f} MiB free)")
            started = time.monotonic()
            try:
                cluster.ctl.run([node.url], "defrag", timeout=DEFRAG_TIMEOUT)
            except (EtcdError, subprocess.TimeoutExpired) as error:
                raise Abort(1, f"defrag of {node.name} failed: {error}") from None
            took = time.monotonic() - started
        cluster.wait_healthy(HEALTHY_WAIT_SECONDS)
        after = cluster.ctl.status(node.url) or {}
        log(f"{node.name} defragmented in {took:.1f}s: {node.db_size / MIB:.1f} -> "
            f"{int(after.get('dbSize', 0)) / MIB:.1f} MiB; every voter healthy again")


def watch_quota(env: ClusterEnv, size: int, quota: int) -> int:
    """1 (the unit fails) from `quota_fail_percent` of the quota on, a warning from `quota_warn_percent`."""
    percent = 100 * size / quota
    text = f"database of {env.member_name} is {size / MIB:.1f} MiB, {percent:.0f}% of the quota ({quota / MIB:.0f} MiB)"
    if percent >= env.quota_fail_percent:
        log(f"ERROR: {text}: etcd raises NOSPACE at 100%; compact and defragment (scripts/etcd-maintain STACK "
            "--defrag) or raise the quota")
        return 1
    log(f"WARNING: {text}" if percent >= env.quota_warn_percent else text)
    return 0


def scheduled(cluster: Cluster, quota: int, lock: Path, backup_wait: float) -> int:
    env = cluster.env
    if Path(env.not_a_member_file).is_file():
        log(f"{env.member_name} is no member: nothing to maintain here")
        return 0
    me = cluster.ctl.status(env.client_url)
    if me is None:
        raise Abort(1, f"the local member {env.client_url} does not answer")
    code = watch_quota(env, int(me["dbSize"]), quota)
    if me["leader"] != me["header"]["member_id"]:
        log(f"{env.member_name} is not the leader: the leader defragments")
        return code
    if alarms := cluster.alarms():
        log(f"ERROR: active alarm(s) {', '.join(alarms)}: no defragmentation; for NOSPACE run "
            "scripts/etcd-maintain STACK --nospace")
        return 1
    try:
        nodes = cluster.nodes()
        for node in nodes:
            log(node.summary(quota))
        if due := defrag_order(nodes, env.defrag_free_percent, env.defrag_free_min_mib):
            defragment(cluster, due, lock, backup_wait)
        else:
            log(f"no member has {env.defrag_free_percent}% and {env.defrag_free_min_mib} MiB free: "
                "no defragmentation")
    except Abort as stop:
        if code == 0:
            raise
        log(f"ERROR: {stop}")  # the quota's failure is the one to report
    return code


def recover_nospace(cluster: Cluster, quota: int, lock: Path, backup_wait: float) -> int:
    """etcd's documented way out of NOSPACE: compact away the history, defragment to give the space
    back, disarm the alarm, then prove that a write is accepted again."""
    alarms = cluster.alarms()
    log(f"step 1/5: active alarms: {', '.join(alarms) or 'none'}")
    if "NOSPACE" not in alarms:
        log("no NOSPACE alarm: nothing to recover")
        return 0
    if "CORRUPT" in alarms:
        raise Abort(1, "a CORRUPT alarm is active too: it is never disarmed; restore (scripts/etcd-restore)")
    nodes = cluster.nodes()
    revision = next((n.revision for n in nodes if n.leader), max(n.revision for n in nodes))
    log(f"step 2/5: compacting to the current revision {revision} (--physical)")
    try:
        cluster.ctl.compact(cluster.endpoints(), revision, physical=True, timeout="280s")
    except EtcdError as error:
        raise Abort(1, f"compact: {error}") from None
    log("step 3/5: defragmenting every member, followers first, the leader last")
    defragment(cluster, defrag_order(nodes), lock, backup_wait)
    nodes = cluster.nodes()
    for node in nodes:
        log(node.summary(quota))
    if over := [n.name for n in nodes if n.db_size * 100 >= quota * cluster.env.quota_fail_percent]:
        # --physical waits for the compaction of the member asked only: another one may have been
        # defragmented before its own ended. A second run tells that apart from live data that does not fit.
        raise Abort(1, f"{', '.join(over)} still at {cluster.env.quota_fail_percent}% of the quota after compaction "
                       "and defragmentation (alarm kept): run this again in a minute; if it stays, the live data "
                       "does not fit: delete keys or raise the quota")
    log("step 4/5: alarm disarm")
    try:
        cluster.ctl.run(cluster.endpoints(), "alarm", "disarm")
        value = f"{cluster.env.member_name}-{time.time():.0f}"
        log(f"step 5/5: writing {PROBE_KEY}")
        cluster.ctl.run(cluster.endpoints(), "put", PROBE_KEY, value)
        kvs = cluster.ctl.json(cluster.endpoints(), "get", PROBE_KEY).get("kvs") or []
        cluster.ctl.run(cluster.endpoints(), "del", PROBE_KEY)
    except EtcdError as error:
        raise Abort(1, f"after disarm: {error}") from None
    if not kvs or (left := cluster.alarms()):
        raise Abort(1, f"the write did not hold (alarms: {', '.join(left) or 'none'})")
    log("OK: NOSPACE cleared, writes are accepted again")
    return 0


def status(cluster: Cluster, quota: int) -> int:
    nodes = cluster.nodes()
    print(json.dumps({"alarms": cluster.alarms(), "quota_bytes": quota, "members": [
        {"name": n.name, "url": n.url, "leader": n.leader, "db_size": n.db_size, "db_size_in_use": n.in_use,
         "free_percent": round(100 * n.free / n.db_size, 1) if n.db_size else 0.0,
         "quota_percent": round(100 * n.db_size / quota, 1)} for n in nodes]}, indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-maintain", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--defrag", action="store_true", help="defragment every member now, one at a time")
    action.add_argument("--nospace", action="store_true", help="recover from a NOSPACE alarm")
    action.add_argument("--status", action="store_true", help="print each voter's sizes and the alarms as JSON")
    parser.add_argument("--backup-wait", type=float, default=600, metavar="SECONDS",
                        help="how long to wait for a running backup to end (default: 600)")
    parser.add_argument("--quota-backend-bytes", type=int, default=0,
                        help=f"etcd's quota (default: ETCD_QUOTA_BACKEND_BYTES of {ETCD_ENV})")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    cluster, quota = Cluster(env, Etcdctl.of(env)), args.quota_backend_bytes or quota_bytes()
    if args.status:
        return status(cluster, quota)
    lock = backup_lock_path()
    if args.nospace:
        return recover_nospace(cluster, quota, lock, args.backup_wait)
    if not args.defrag:
        return scheduled(cluster, quota, lock, args.backup_wait)
    if alarms := cluster.alarms():
        raise Abort(1, f"active alarm(s) {', '.join(alarms)}: for NOSPACE use --nospace")
    nodes = cluster.nodes()
    for node in nodes:
        log(node.summary(quota))
    defragment(cluster, defrag_order(nodes), lock, args.backup_wait)
    log("OK: every member defragmented")
    return 0
