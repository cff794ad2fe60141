"""etcd-spare-watch: on a bare-metal spare, take the slot of a voter that has looked dead too long.

Run by etcd-spare-watch.timer. A spare carries the same files as a member, but its etcd does
not run. When a voter has been unhealthy for at least `spare_takeover_after_seconds` (the
first sighting is kept on the spare's disk), the spare takes its place by runtime
reconfiguration, one replacement at a time: remove the dead member (only while the healthy
rest stays a quorum), add this host as a learner, start etcd (etcd-member-promote promotes
it), and report the takeover in takeover.json and the journal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl
from kcp_host.files import utc_iso, utc_stamp, write_atomic
from kcp_host.log import Abort, log
from kcp_host.membership import (
    ClusterView,
    data_dir_has_content,
    other_endpoints,
    quorum,
    refuse_without_learner_support,
    replacement_lock,
)


class SpareState:
    """Files on the spare's own disk, so an interrupted takeover resumes after a reboot:
    `spare-watch.seen` (`ID FIRST_UNHEALTHY_EPOCH NAME` lines), `spare-takeover.intent` (the member
    being replaced: `ID SINCE NAME PEER_URLS`) and `takeover.json` (the finished report)."""

    def __init__(self, env: ClusterEnv) -> None:
        self.dir = Path(env.state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seen, self.intent, self.report = (self.dir / "spare-watch.seen", self.dir / "spare-takeover.intent",
                                               self.dir / "takeover.json")

    def first_sightings(self) -> dict[str, str]:
        lines = self.seen.read_text().splitlines() if self.seen.exists() else []
        return {parts[0]: parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2}

    def update_seen(self, view: ClusterView, now: int) -> list[str]:
        """Rewrite the table from the health just probed, keeping earlier first sightings; healthy
        members drop out. Returns its lines."""
        earlier = self.first_sightings()
        lines = [f"{m.hex_id} {earlier.get(m.hex_id, now)} {m.name or '-'}" for m in view.silent_voters()]
        write_atomic(self.seen, "".join(f"{line}\n" for line in lines))
        return lines


def write_report(env: ClusterEnv, state: SpareState, intent: list[str], joined_id: int) -> None:
    """takeover.json, plus one journal line that operators and the stack update can grep for."""
    member_id, since, name, peers = intent
    write_atomic(state.report, json.dumps({
        "event": "etcd-spare-takeover", "cluster": env.cluster_name, "time": utc_iso(),
        "spare": {"name": env.member_name, "peer_url": env.peer_url, "client_url": env.client_url,
                  "member_id": f"{joined_id:x}"},
        "replaced": {"member_id": member_id, "name": name, "peer_urls": peers, "unhealthy_since_epoch": int(since)},
    }, indent=2) + "\n")
    log(f"TAKEOVER: spare {env.member_name} ({env.peer_url}) replaced member {member_id} ({name}, {peers}); "
        f"report in {state.report}; update the stack configuration")


def takeover_locked(env: ClusterEnv, ctl: Etcdctl, state: SpareState, endpoints: list[str]) -> None:
    """Under the replacement lock; everything is re-checked, since another spare or a recovering
    member may have acted meanwhile."""
    intent = state.intent.read_text().split()
    view = ClusterView(env, ctl)
    if not view.fetch(endpoints):
        raise Abort(3, "no member answered under the lock")
    endpoints = view.endpoints()
    view.probe_health()
    dead = view.by_id(int(intent[0], 16))
    if dead is not None:
        if view.healthy.get(dead.id):
            log(f"member {dead.hex_id} is healthy again; no takeover")
            state.intent.unlink()
            return
        if not view.remove_stale_learners(endpoints):
            raise Abort(5, "another replacement is in progress")
        if not view.safe_to_remove(dead):
            raise Abort(3, f"removing member {dead.hex_id} would lose quorum; no takeover")
        since = time.strftime("%H:%M:%SZ", time.gmtime(int(intent[1])))
        view.remove(endpoints, dead, f"unhealthy since {since}; spare {env.member_name} takes over")
        if not view.fetch(endpoints):
            raise Abort(3, "no member answered")
        view.probe_health()
    for leftover in view.in_slot():
        if view.healthy.get(leftover.id):
            raise Abort(6, f"a healthy member already runs as {env.member_name}")
        view.remove(endpoints, leftover, "left over from an earlier takeover attempt by this spare")
    voters, healthy = view.count_voters(m.id for m in view.in_slot())
    if voters >= len(env.members):
        log(f"the cluster has its {len(env.members)} voters again; no takeover")
        state.intent.unlink()
        return
    if healthy < quorum(voters):
        raise Abort(3, f"no quorum ({healthy} of {voters}); no takeover")
    if data_dir_has_content(env.data_dir):
        os.rename(env.data_dir, f"{env.data_dir}.spare-{utc_stamp()}")
    joined = view.join_as_learner(endpoints)
    write_report(env, state, intent, joined)
    state.intent.unlink()


def ensure_etcd_running(env: ClusterEnv) -> None:
    """After a takeover this host is a member for good."""
    if not systemd.is_enabled(env.etcd_unit):
        systemd.systemctl("enable", env.etcd_unit)
    if systemd.is_active(env.etcd_unit):
        return
    log(f"starting {env.etcd_unit} as the replacement member")
    if systemd.systemctl("start", env.etcd_unit).returncode != 0:
        raise Abort(1, f"{env.etcd_unit} failed to start; it retries by itself (Restart=always)")


def watch(env: ClusterEnv, ctl: Etcdctl) -> None:
    """One check; the timer provides the repetition."""
    state = SpareState(env)
    if state.report.exists():
        ensure_etcd_running(env)
        return
    view = ClusterView(env, ctl)
    asked = other_endpoints(env)
    if not view.fetch(asked):
        raise Abort(1, f"no member answered at {','.join(asked)}; cannot judge member health")
    view.probe_health()
    now = int(time.time())
    seen = state.update_seen(view, now)
    if state.intent.exists() and state.intent.read_text().strip():
        log(f"resuming the takeover in {state.intent}")
    else:
        after = env.spare_takeover_after_seconds
        overdue = next((line.split() for line in seen if now - int(line.split()[1]) >= after), None)
        if overdue is None:
            if seen:
                log(f"unhealthy, not yet overdue: {';'.join(seen)};")
            return
        member = view.by_id(int(overdue[0], 16))
        assert member is not None
        if not view.safe_to_remove(member):
            raise Abort(3, f"member {member.hex_id} ({member.name}) is overdue but removing it would lose quorum; "
                           "not taking over")
        write_atomic(state.intent, f"{member.hex_id} {overdue[1]} {member.name or '-'} {','.join(member.peer_urls)}\n")
        log(f"member {member.hex_id} ({member.name}) unhealthy for over {after}s; taking over")
    with replacement_lock(env, ctl, view.endpoints()):
        takeover_locked(env, ctl, state, view.endpoints())
    if state.report.exists():
        ensure_etcd_running(env)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kcp-host etcd-spare-watch", description=__doc__.splitlines()[0]).parse_args(argv)
    env = load_env(ClusterEnv)
    ctl = Etcdctl.of(env)
    refuse_without_learner_support(ctl)
    watch(env, ctl)
    return 0
