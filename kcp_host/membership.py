"""What every membership change shares: one view of the cluster, quorum arithmetic, the
cluster-wide replacement lock and the learner join.

Member recovery, promotion and the spare watch all go through here, so they apply the same
guards: a voter is removed only while the healthy rest stays a quorum, one replacement runs
at a time (an etcd lock on a TTL-ed lease), and learners left over from failed joins are
cleaned up. docs/self-healing.md has the rules in prose.
"""

from __future__ import annotations

import base64
import contextlib
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kcp_host.contract import ClusterEnv
from kcp_host.etcd import Etcdctl, EtcdError, Member, command_env
from kcp_host.files import write_atomic
from kcp_host.log import Abort, log

LOCK_NAME = "kcp/member-replacement"
JOIN_PREFIX = "kcp/join/"
REMOVED_PREFIX = "kcp/removed/"  # name -> peer URL of a member the stack dropped (etcd-reconcile-members)
ADD_ATTEMPTS = 10


def quorum(voters: int) -> int:
    """Votes needed among `voters`."""
    return voters // 2 + 1


def other_endpoints(env: ClusterEnv) -> list[str]:
    """The configured client URLs without this host's own."""
    return [e for e in env.client_endpoints if e != env.client_url]


class ClusterView:
    """The member list as one member answered it, and each member's health as probed from here."""

    def __init__(self, env: ClusterEnv, ctl: Etcdctl, self_down: bool = False) -> None:
        self.env, self.ctl, self.self_down = env, ctl, self_down
        self.members: list[Member] = []
        self.healthy: dict[int, bool] = {}

    def fetch(self, endpoints: list[str]) -> bool:
        """True when some member answered."""
        self.members = self.ctl.members(endpoints) or []
        self.healthy = {}
        return bool(self.members)

    def endpoints(self) -> list[str]:
        """Client URLs of every started voter plus the configured ones (a spare that took over a slot
        is not configured until the stack follows), without this host's own."""
        urls = {u for m in self.members if not m.learner for u in m.client_urls} | set(self.env.client_endpoints)
        urls.discard(self.env.client_url)
        return sorted(urls)

    def in_slot(self) -> list[Member]:
        """Members holding this host's slot: its name or its peer URL (a stale member may carry either)."""
        return [m for m in self.members
                if (m.name and m.name == self.env.member_name) or self.env.peer_url in m.peer_urls]

    def by_id(self, member_id: int) -> Member | None:
        return next((m for m in self.members if m.id == member_id), None)

    def probe_health(self) -> None:
        """A quorum read through each member's own URLs, in parallel: dead members cost one timeout."""
        def probe(m: Member) -> bool:
            if not m.client_urls or (self.self_down and self.env.client_url in m.client_urls):
                return False
            return self.ctl.healthy(list(m.client_urls))
        with ThreadPoolExecutor(max_workers=max(1, len(self.members))) as pool:
            self.healthy = dict(zip((m.id for m in self.members), pool.map(probe, self.members), strict=True))

    def silent_voters(self) -> list[Member]:
        """Voters that did not answer the last `probe_health`."""
        return [m for m in self.members if not m.learner and not self.healthy.get(m.id)]

    def count_voters(self, excluded: Iterable[int] = ()) -> tuple[int, int]:
        """(voters, healthy voters) among voters not excluded; learners never vote."""
        skip = set(excluded)
        voters = [m for m in self.members if not m.learner and m.id not in skip]
        return len(voters), sum(self.healthy.get(m.id, False) for m in voters)

    def safe_to_remove(self, member: Member, removed: Iterable[int] = ()) -> bool:
        """A voter may go only if the remaining healthy voters are a quorum of the remaining voters."""
        if member.learner:
            return True
        if self.healthy.get(member.id, False):
            return False
        voters, healthy = self.count_voters([member.id, *removed])
        return voters > 0 and healthy >= quorum(voters)

    def live_joins(self, endpoints: list[str]) -> set[str]:
        """Peer URLs with a live join intent (a key under kcp/join/ bound to a lease)."""
        try:
            answer = self.ctl.json(endpoints, "get", "--prefix", JOIN_PREFIX)
        except EtcdError as error:
            raise Abort(1, f"cannot read join keys: {error}") from None
        return {base64.b64decode(kv["value"]).decode() for kv in answer.get("kvs") or []}

    def removed_by_stack(self, endpoints: list[str]) -> bool:
        """Whether the stack dropped this very host (its name and peer URL are marked removed)."""
        try:
            answer = self.ctl.json(endpoints, "get", REMOVED_PREFIX + self.env.member_name)
        except EtcdError:
            return False
        return any(base64.b64decode(kv["value"]).decode() == self.env.peer_url for kv in answer.get("kvs") or [])

    def remove(self, endpoints: list[str], member: Member, reason: str) -> None:
        log(f"removing member {member.hex_id} (name='{member.name}' peers={','.join(member.peer_urls)} "
            f"learner={str(member.learner).lower()}): {reason}")
        # Not through the leaving member itself: it stops as soon as the removal applies, and its
        # answer ("server stopped") would hide that the removal succeeded.
        others = [e for e in endpoints if e not in member.client_urls] or endpoints
        try:
            self.ctl.run(others, "member", "remove", member.hex_id)
        except EtcdError as error:
            gone = self.ctl.members(others)
            if gone is None or any(m.id == member.id for m in gone):  # another host may have removed it first
                raise Abort(1, f"member remove {member.hex_id} failed: {error}") from None

    def remove_stale_learners(self, endpoints: list[str]) -> bool:
        """Remove learners left over from failed joins (no live join key, etcd not answering): they
        block every other replacement. False when another host's join is in progress."""
        joins = self.live_joins(endpoints)
        for m in [m for m in self.members if m.learner and m not in self.in_slot()]:
            if m.peer_urls and m.peer_urls[0] in joins:
                log(f"member {m.hex_id} ({','.join(m.peer_urls)}) is joining right now")
                return False
            if m.client_urls and self.ctl.status(m.client_urls[0]) is not None:
                log(f"learner {m.hex_id} ({','.join(m.peer_urls)}) is running; leaving it to its promoter")
                return False
            self.remove(endpoints, m, "stale learner from an earlier failed join")
        return True

    def drop_own_unstarted_learner(self, endpoints: list[str]) -> None:
        """Undo a member add of this host whose answer was lost, so that it can be retried."""
        if not self.fetch(endpoints):
            return
        for m in self.members:
            if m.learner and not m.started and self.env.peer_url in m.peer_urls:
                self.remove(endpoints, m, "retrying a member add whose answer was lost")

    def join_as_learner(self, endpoints: list[str]) -> int:
        """The locked part of every replacement: announce the join, add this host as a learner and
        write join.env, so that the next etcd start joins the existing cluster. Returns its ID."""
        env = self.env
        try:
            lease = self.ctl.json(endpoints, "lease", "grant", str(env.join_timeout_seconds))["ID"]
            self.ctl.run(endpoints, "put", f"--lease={lease:x}", JOIN_PREFIX + env.member_name, env.peer_url)
        except (EtcdError, KeyError) as error:
            raise Abort(1, f"cannot write the join key: {error}") from None
        # etcd refuses an add for a few seconds after a member left ("member not found",
        # "unhealthy cluster"); a failed add may still have landed.
        for attempt in range(1, ADD_ATTEMPTS + 1):
            try:
                added = self.ctl.json(endpoints, "member", "add", env.member_name, "--learner",
                                      f"--peer-urls={env.peer_url}")
                break
            except EtcdError as error:
                log(f"member add --learner, attempt {attempt}: {error}")
            time.sleep(2)
            self.drop_own_unstarted_learner(endpoints)
        else:
            raise Abort(1, f"member add --learner failed {ADD_ATTEMPTS} times")
        new_id = int(added["member"]["ID"])
        cluster = ",".join(f"{env.member_name if int(m['ID']) == new_id else m.get('name', '')}={url}"
                           for m in added["members"] for url in m.get("peerURLs") or ())
        log(f"Member {new_id:x} added to cluster {int(added['header']['cluster_id']):x}")
        write_join_env(env, cluster)
        return new_id


def write_join_env(env: ClusterEnv, initial_cluster: str) -> None:
    """Atomically, so a crash leaves the old file or the new one, never half of one."""
    write_atomic(env.join_env, f"ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER={initial_cluster}\n")
    log(f"wrote {env.join_env} (initial cluster {initial_cluster})")


@contextlib.contextmanager
def replacement_lock(env: ClusterEnv, ctl: Etcdctl, endpoints: list[str]) -> Iterator[None]:
    """Hold the cluster-wide replacement lock for the block: `etcdctl lock` on a lease of
    `lock_ttl_seconds` that etcdctl keeps alive, so a holder that crashes frees it after the TTL.
    Waiting is bounded by `lock_wait_seconds`; not getting it is Abort(5)."""
    argv = ctl.argv(endpoints, "lock", f"--ttl={env.lock_ttl_seconds}", LOCK_NAME, "-w", "json")
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=command_env())
    try:
        if not _first_line(holder, env.lock_wait_seconds):
            raise Abort(5, f"could not take the replacement lock {LOCK_NAME} within {env.lock_wait_seconds}s")
        yield
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGTERM)  # etcdctl unlocks, then exits
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()


def _first_line(proc: subprocess.Popen[bytes], wait_seconds: float) -> bool:
    """True once `etcdctl lock` printed the key it holds; False if it exited or time ran out."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if selector.select(timeout=wait_seconds):
            return bool(proc.stdout.readline().strip())
    return False


def data_dir_has_content(path: str) -> bool:
    directory = Path(path)
    return directory.is_dir() and any(directory.iterdir())


def refuse_without_learner_support(ctl: Etcdctl) -> None:
    """Learners (member add --learner, member promote) exist from etcd 3.4 on."""
    version = ctl.version()
    if version is None:
        raise Abort(2, "cannot read the etcdctl version")
    if version < (3, 4):
        raise Abort(2, f"etcdctl {version[0]}.{version[1]} has no learner support; 3.4 or newer is required")

