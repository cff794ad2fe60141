"""A member's lifecycle steps that the program runs over SSH: wait until healthy, restart one
member while the rest keep quorum, and leave the cluster when its host leaves the stack."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError
from kcp_host.files import utc_stamp
from kcp_host.log import Abort, log
from kcp_host.membership import quorum


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


def wait_healthy(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-wait-healthy", description=await_healthy.__doc__)
    parser.add_argument("timeout", nargs="?", type=float, default=120, help="seconds (default: 120)")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    await_healthy(env, Etcdctl.of(env), args.timeout)
    print(f"etcd healthy: all endpoints of {env.cluster_name} answer, one leader")
    return 0


def rolling_restart(argv: list[str]) -> int:
    """Restart this member after its configuration changed, only while the whole cluster is healthy,
    then wait until it is healthy again. The program chains these steps host after host, so a
    rollout never takes more than one member down at once. Nothing to do where etcd is not running."""
    argparse.ArgumentParser(prog="kcp-host etcd-rolling-restart", description=rolling_restart.__doc__).parse_args(argv)
    env = load_env(ClusterEnv)
    if not systemd.is_active(env.etcd_unit):
        print("etcd not running here: nothing to restart")
        return 0
    ctl = Etcdctl.of(env)
    await_healthy(env, ctl, 120)
    systemd.systemctl("restart", env.etcd_unit, check=True)
    await_healthy(env, ctl, 120)
    return 0


def leave(argv: list[str]) -> int:
    """Remove this host's member and stop etcd when the host leaves the stack. Refused when the
    members that remain would not hold a healthy quorum (another one is down already); the last
    member just stops. Its data dir is moved aside, never deleted."""
    argparse.ArgumentParser(prog="kcp-host etcd-member-leave", description=leave.__doc__).parse_args(argv)
    env = load_env(ClusterEnv)
    if not systemd.is_active(env.etcd_unit):
        systemd.systemctl("disable", env.etcd_unit)
        print(f"etcd not running on {env.member_name}: nothing to remove")
        return 0
    ctl = Etcdctl.of(env)
    members = ctl.members(env.client_endpoints) or []
    me = next((m for m in members if env.peer_url in m.peer_urls), None)
    healthy = sum(ctl.health(env.client_endpoints).values())
    if me is not None and len(members) > 1:
        # After the removal, len - 1 members remain and healthy - 1 of them are healthy.
        if healthy - 1 < quorum(len(members) - 1):
            raise Abort(1, f"refusing to remove {env.member_name}: {healthy} of {len(members)} members healthy; "
                           "removal could lose quorum")
        ctl.run(env.client_endpoints, "member", "remove", me.hex_id)
        print(f"removed member {env.member_name} ({me.hex_id})")
    systemd.systemctl("disable", "--now", env.etcd_unit, check=True)
    if Path(env.data_dir).exists():
        os.rename(env.data_dir, f"{env.data_dir}.removed-{utc_stamp()}")
    log("etcd stopped and disabled; data dir moved aside")
    return 0
