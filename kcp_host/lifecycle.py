"""A member's lifecycle steps that the program runs over SSH: wait until healthy, restart one member
only when its configuration changed and the rest keep quorum, and leave when its host leaves the stack."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kcp_host import systemd
from kcp_host.contract import ETCD_ENV, ClusterEnv, load_env, parse_env_text
from kcp_host.etcd import Etcdctl, EtcdError
from kcp_host.files import utc_stamp
from kcp_host.log import Abort, log
from kcp_host.membership import ClusterView, quorum


def await_healthy(env: ClusterEnv, ctl: Etcdctl, timeout: float) -> None:
    """Every configured member answers a quorum read and all of them agree on one leader, so
    nothing that depends on etcd starts against a cluster still forming."""
    deadline = time.monotonic() + timeout
    while not ctl.healthy(env.client_endpoints, dial="2s", timeout="5s"):
        if time.monotonic() >= deadline:
            unhealthy = [e for e, ok in ctl.health(env.client_endpoints).items() if not ok]
            raise Abort(1, f"etcd not healthy after {timeout:.0f}s: {', '.join(unhealthy) or 'no answer'}")
        time.sleep(1)
    try:
        statuses = ctl.json(env.client_endpoints, "endpoint", "status")
    except EtcdError as error:
        raise Abort(1, f"endpoint status: {error}") from None
    leaders = {s["Status"]["leader"] for s in statuses}
    if len(leaders) != 1:
        raise Abort(1, f"expected one leader, saw {len(leaders)}")


def _until(env: ClusterEnv, ctl: Etcdctl, timeout: float, lacking: Callable[[ClusterView], list[str]],
           what: str) -> ClusterView:
    """Re-read the member list every second until `lacking` finds nothing missing in it; fails naming what is."""
    view, deadline = ClusterView(env, ctl), time.monotonic() + timeout
    while True:
        missing = lacking(view) if view.fetch([*view.endpoints(), env.client_url]) else ["no member answered"]
        if not missing:
            return view
        if time.monotonic() >= deadline:
            raise Abort(1, f"{what} after {timeout:.0f}s: {', '.join(missing)}")
        time.sleep(1)


def await_voters_healthy(env: ClusterEnv, ctl: Etcdctl, timeout: float) -> int:
    """Every voter the cluster lists (not the configured list: members a change adds join later) is
    healthy, so restarting one of them keeps a quorum. Returns how many voters there are."""
    def sick(view: ClusterView) -> list[str]:
        view.probe_health()
        return [m.name or m.hex_id for m in view.silent_voters()]

    return _until(env, ctl, timeout, sick, "voters not healthy").count_voters()[0]


def await_voters(env: ClusterEnv, ctl: Etcdctl, names: list[str], timeout: float) -> None:
    """Every named member is a started voter: members a change adds join one at a time (the replacement
    lock), each as a learner promoted once caught up, after their own start step returned."""
    def not_voting(view: ClusterView) -> list[str]:
        voters = {m.name for m in view.members if m.started and not m.learner}
        return [n for n in names if n not in voters]

    _until(env, ctl, timeout, not_voting, "not voting members")


def config_fingerprint(env: ClusterEnv, etcd_env: str = ETCD_ENV, units: str = "/etc/systemd/system") -> str:
    """What etcd reads when it starts: its binary (a new release), etcd.env without the `ETCD_INITIAL_*`
    settings (used only to bootstrap), the unit, and every file etcd.env names (certificates and keys)."""
    text = Path(etcd_env).read_text(encoding="utf-8") if Path(etcd_env).is_file() else ""
    settings = {k: v for k, v in parse_env_text(text).items() if not k.startswith("ETCD_INITIAL_")}
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    binary = Path(shutil.which("etcd", path="/usr/local/bin:/usr/bin") or "/usr/local/bin/etcd").resolve()
    for path in [binary, Path(units) / env.etcd_unit,
                 *(Path(v) for k, v in sorted(settings.items()) if k.endswith("_FILE"))]:
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()


def wait_healthy(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-wait-healthy", description=await_healthy.__doc__)
    parser.add_argument("timeout", nargs="?", type=float, default=120, help="seconds (default: 120)")
    parser.add_argument("--voters", default="", help="members (name,...) that must be voting members first")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    ctl, deadline = Etcdctl.of(env), time.monotonic() + args.timeout
    await_voters(env, ctl, [n for n in args.voters.split(",") if n], args.timeout)
    await_healthy(env, ctl, max(deadline - time.monotonic(), 1))
    print(f"etcd healthy: all endpoints of {env.cluster_name} answer, one leader")
    return 0


def rolling_restart(argv: list[str]) -> int:
    """Restart this member when what etcd reads at start changed since it started, only while every
    voter is healthy, then wait until all are again. The program chains these steps host after host,
    so a rollout never takes more than one member down at once; a change that etcd does not read
    (membership, backups) restarts nothing."""
    argparse.ArgumentParser(prog="kcp-host etcd-rolling-restart", description=rolling_restart.__doc__).parse_args(argv)
    env = load_env(ClusterEnv)
    if not systemd.is_active(env.etcd_unit):
        print("etcd not running here: nothing to restart")
        return 0
    started = Path(env.started_config_file)
    if started.is_file() and started.read_text().strip() == config_fingerprint(env):
        print("etcd's configuration is unchanged since it started: no restart")
        return 0
    ctl = Etcdctl.of(env)
    voters = await_voters_healthy(env, ctl, 120)
    if 1 < voters < 3:
        raise Abort(3, f"restarting {env.member_name} would leave 1 of {voters} voters, no quorum: apply the change "
                       "of members and the change of configuration in two `pulumi up`s (the preview's rollout steps "
                       "show it); nothing was restarted")
    log(f"restarting {env.etcd_unit}: its configuration changed")
    systemd.act("restart", env.etcd_unit)
    await_voters_healthy(env, ctl, 120)
    return 0


def leave(argv: list[str]) -> int:
    """Remove this host's member and stop etcd when the host leaves the stack. Refused when the
    members that remain would not hold a healthy quorum (another one is down already); a member
    already removed (etcd-reconcile-members did it) or the last one just stops. Its data dir is
    moved aside, never deleted."""
    argparse.ArgumentParser(prog="kcp-host etcd-member-leave", description=leave.__doc__).parse_args(argv)
    env = load_env(ClusterEnv)
    if not systemd.is_active(env.etcd_unit):
        systemd.systemctl("disable", env.etcd_unit)
        print(f"etcd not running on {env.member_name}: nothing to remove")
        return 0
    ctl = Etcdctl.of(env)
    members = ctl.members(env.client_endpoints) or []
    me = next((m for m in members if env.peer_url in m.peer_urls), None)
    if me is not None and len(members) > 1:
        healthy = sum(ctl.health(env.client_endpoints).values())
        # After the removal, len - 1 members remain and healthy - 1 of them are healthy.
        if healthy - 1 < quorum(len(members) - 1):
            raise Abort(1, f"refusing to remove {env.member_name}: {healthy} of {len(members)} members healthy; "
                           "removal could lose quorum")
        # Asked of the members that stay: this one stops once it applies its own removal, and may answer
        # "server stopped" to the request that removed it.
        stay = [url for m in members if m.id != me.id for url in m.client_urls]
        ctl.run(stay or env.client_endpoints, "member", "remove", me.hex_id)
        print(f"removed member {env.member_name} ({me.hex_id})")
    systemd.systemctl("disable", "--now", env.etcd_unit, check=True)
    if Path(env.data_dir).exists():
        os.rename(env.data_dir, f"{env.data_dir}.removed-{utc_stamp()}")
    log("etcd stopped and disabled; data dir moved aside")
    return 0
