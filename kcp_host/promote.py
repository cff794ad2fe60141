"""etcd-member-promote: after every etcd start, record this member's ID and promote it if it is a learner.

Run by etcd-member-promote.service, which etcd-member-recovery queues before each start and
which is ordered after etcd.service. It waits for the local member, records its ID beside its
data (so data that outlives its membership is recognised), promotes a learner once etcd
accepts it (etcd refuses until the learner has caught up), then marks the cluster formed.
Bounded by `promote_timeout_seconds`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, last_line
from kcp_host.files import utc_iso, write_atomic
from kcp_host.log import Abort, log
from kcp_host.membership import JOIN_PREFIX, ClusterView, other_endpoints

NOT_CAUGHT_UP = ("in sync with leader", "not ready")


def local_member_id(env: ClusterEnv, ctl: Etcdctl) -> int | None:
    status = ctl.status(env.client_url)
    return int(status["header"]["member_id"]) if status else None


def record_member_id(env: ClusterEnv, member_id: int) -> None:
    """Beside the data it describes; nothing to do while the data dir has no member dir yet."""
    if Path(env.member_id_file).parent.is_dir():
        write_atomic(env.member_id_file, f"{member_id:x}\n")


def mark_formed(env: ClusterEnv, ctl: Etcdctl) -> None:
    """A healthy voter means the cluster exists: from now on an empty data dir on any host means
    "replace me", never "bootstrap"."""
    if Path(env.cluster_formed_file).exists():
        return
    for _ in range(10):
        if ctl.healthy([env.client_url]):
            write_atomic(env.cluster_formed_file, utc_iso() + "\n")
            log(f"marked the cluster formed ({env.cluster_formed_file})")
            return
        time.sleep(1)
    log("warning: local member not healthy; cluster-formed marker not written")


def promote_until_voter(env: ClusterEnv, view: ClusterView, member_id: int, deadline: float) -> bool:
    """Retry promote once a second until the member is a voter or `deadline` passes."""
    while time.monotonic() < deadline:
        # etcd may have restarted meanwhile as a new member (a rejoin): follow it.
        now = local_member_id(env, view.ctl)
        if now is not None and now != member_id:
            log(f"local member is now {now:x} (was {member_id:x})")
            member_id = now
            record_member_id(env, member_id)
        member = view.by_id(member_id) if view.fetch(other_endpoints(env)) else None
        if member is not None:
            if not member.learner:
                return True
            proc = view.ctl.run(view.endpoints(), "member", "promote", member.hex_id, check=False)
            if proc.returncode == 0:
                log(f"promoted learner {member.hex_id} to a voting member")
                return True
            answer = proc.stdout + proc.stderr
            if not any(reason in answer for reason in NOT_CAUGHT_UP):
                log(f"member promote {member.hex_id}: {last_line(answer)}")
        time.sleep(1)
    return False


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kcp-host etcd-member-promote", description=__doc__.splitlines()[0]).parse_args(argv)
    env = load_env(ClusterEnv)
    ctl = Etcdctl.of(env)
    deadline = time.monotonic() + env.promote_timeout_seconds
    member_id = local_member_id(env, ctl)
    while member_id is None and time.monotonic() < deadline:
        time.sleep(1)
        member_id = local_member_id(env, ctl)
    if member_id is None:
        raise Abort(1, f"local etcd at {env.client_url} did not answer within {env.promote_timeout_seconds}s")
    record_member_id(env, member_id)
    view = ClusterView(env, ctl)
    if not promote_until_voter(env, view, member_id, deadline):
        raise Abort(1, f"learner {member_id:x} was not promoted within {env.promote_timeout_seconds}s; "
                       "it retries at the next etcd start")
    ctl.run(view.endpoints(), "del", JOIN_PREFIX + env.member_name, check=False)
    mark_formed(env, ctl)
    return 0
