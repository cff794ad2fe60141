"""etcd-reconcile-members: make the cluster's membership follow the stack before the rest of a change runs.

The program runs it on every member host, host after host, before that host's firewall changes:
members the stack no longer lists are removed from a host that still reaches them (a leaver's own
delete step runs only at the end of `pulumi up`, after the others' firewalls dropped it), one at a
time, each only while the rest keep a healthy quorum, with leadership moved away first. Each is
marked under kcp/removed/ so that its etcd, if it still runs, does not rejoin; a host the stack lists
again is unmarked. A host with no member configuration yet, or that reaches no member, has nothing to do.
On GCE and AWS, `cloud-refresh` runs `follow` with the members of a slot's new bundle.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, Member
from kcp_host.log import Abort, log
from kcp_host.membership import REMOVED_PREFIX, ClusterView, quorum


def peers(text: str) -> dict[str, str]:
    """`name=peerURL,...` -> {name: peer URL}."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def move_leadership(view: ClusterView, leaving: Member) -> None:
    """A leader that is removed stops leading only after it is gone: hand leadership over first."""
    status = view.ctl.status(leaving.client_urls[0]) if leaving.client_urls else None
    if status is None or status["leader"] != leaving.id:
        return
    heir = next((m for m in view.members if m.id != leaving.id and not m.learner and view.healthy.get(m.id)), None)
    if heir is not None:
        view.ctl.run(list(leaving.client_urls), "move-leader", heir.hex_id, check=False)
        log(f"moved leadership from {leaving.name} to {heir.name}")


def remove(view: ClusterView, endpoints: list[str], leaving: Member) -> None:
    view.probe_health()
    if not leaving.learner:
        voters, healthy = view.count_voters([leaving.id])
        if voters == 0 or healthy < quorum(voters):
            raise Abort(3, f"removing {leaving.name or leaving.hex_id} would leave {healthy} healthy of {voters} "
                           f"voters, below a quorum of {quorum(voters)}; nothing removed. Bring the unhealthy members "
                           "back first, or remove fewer members at once")
        move_leadership(view, leaving)
    if leaving.name and leaving.peer_urls:
        view.ctl.run(endpoints, "put", REMOVED_PREFIX + leaving.name, leaving.peer_urls[0])
    view.remove(endpoints, leaving, "the stack no longer lists it")
    deadline = time.monotonic() + 60
    while True:
        if view.fetch(endpoints) and view.by_id(leaving.id) is None:
            view.probe_health()
            voters, healthy = view.count_voters()
            if healthy >= quorum(voters):
                return
        if time.monotonic() > deadline:
            raise Abort(1, f"the cluster did not settle within 60s after removing {leaving.name}")
        time.sleep(1)


def leavers(members: list[Member], wanted: dict[str, str]) -> list[Member]:
    """The members whose peer URLs `wanted` (name -> peer URL) lacks."""
    return [m for m in members if not set(m.peer_urls) & set(wanted.values())]


def follow(env: ClusterEnv, wanted: dict[str, str]) -> None:
    """Remove the members whose peer URL `wanted` (name -> peer URL) lacks, one at a time; unmark the wanted."""
    if not wanted:
        raise Abort(1, "no members given: nothing removed")
    view = ClusterView(env, Etcdctl.of(env))
    endpoints = [*view.endpoints(), env.client_url]
    if not view.fetch(endpoints):
        log("no member answered from this host: nothing to reconcile from here")
        return
    endpoints = [*view.endpoints(), env.client_url]
    for name in wanted:
        view.ctl.run(endpoints, "del", REMOVED_PREFIX + name, check=False)
    leaving = leavers(view.members, wanted)
    for member in sorted(leaving, key=lambda m: not m.learner):
        try:
            remove(view, endpoints, member)
        except EtcdError as error:
            raise Abort(1, f"removing {member.name or member.hex_id}: {error}") from None
    log(f"membership follows the stack: {', '.join(sorted(wanted))}" + (
        f" (removed {', '.join(m.name or m.hex_id for m in leaving)})" if leaving else ""))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-reconcile-members", description=__doc__.splitlines()[0])
    parser.add_argument("--members", required=True, help="the stack's members: name=peerURL,...")
    parser.add_argument("--spares", default="", help="the stack's spares (a spare may have taken a slot)")
    args = parser.parse_args(argv)
    if not Path(os.environ.get(ClusterEnv.OVERRIDE, ClusterEnv.PATH)).is_file():
        log("no member configuration on this host yet: nothing to reconcile from here")
        return 0
    follow(load_env(ClusterEnv), {**peers(args.members), **peers(args.spares)})
    return 0
