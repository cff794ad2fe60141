"""cloud-refresh: configuration, certificate and version changes reach running GCE and AWS machines, one at a time.

Bundles are otherwise read only at boot, and the groups never roll etcd members, so `kcp-cloud-refresh.timer` runs
this on every cloud machine. It fetches the agent's and the slot's bundles as the boot path does; when they differ
from the ones it applied last, it holds the lock that member replacements take (so the two never overlap), removes
the members the stack dropped (`follow_membership`), checks that every voter is healthy and none is joining, unpacks,
installs a new release, restarts only what reads a changed file and waits until healthy again before the next
machine may go. A failure records nothing and exits non-zero: the lock goes (its lease, if this process died), the
others find a voter unhealthy before they touch anything, and the next run tries again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

from kcp_host import cloudboot, install, lifecycle, reconcile, systemd
from kcp_host.clouds import CloudError, retry
from kcp_host.contract import (
    AGENT,
    REFRESH_APPLIED,
    STATIC_PODS_STARTED,
    BootEnv,
    ClusterEnv,
    ContractError,
    SlotEnv,
    env_name,
    load_env,
    parse_env_text,
)
from kcp_host.etcd import Etcdctl
from kcp_host.files import write_atomic
from kcp_host.log import Abort, log
from kcp_host.membership import ClusterView, replacement_lock
from kcp_host.staticpods import READY_SECONDS, await_readyz, kubelet_fingerprint, restart_static_pods


def read_secret(env: BootEnv, name: str) -> str:
    cloud = cloudboot.cloud_of(env)
    return retry(f"read the secret {name}", 5, 10, lambda: cloud.secret(name))


def fetch(env: BootEnv, slot: str) -> tuple[str, str]:
    """The agent's bundle (its pieces joined, as kcp-bootstrap joins them) and the slot's, from the secret store."""
    return "".join(read_secret(env, name) for name in env.programs_secrets), read_secret(env, slot)


def digest(programs: str, files: str) -> str:
    return hashlib.sha256(f"{programs}\n{files}".encode()).hexdigest()


def etcd_client(env: BootEnv, slot: SlotEnv) -> ClusterEnv:
    """A member reaches etcd as itself; an API server, no member, as the client its bundle names (for the lock)."""
    if "etcd" in env.roles:
        return load_env(ClusterEnv)
    if len(slot.etcd_client) != 3 or not slot.etcd_endpoints:
        raise ContractError(f"{SlotEnv.PATH} names no etcd client for an API server")
    ca, cert, key = slot.etcd_client
    return ClusterEnv(cluster_name=env.cluster, member_name=slot.name, peer_url="", client_url="", members=(),
                      client_endpoints=slot.etcd_endpoints, etcd_ca=ca, etcd_cert=cert, etcd_key=key, data_dir="")


def bundle_members(files: str) -> dict[str, str]:
    """Name -> peer URL of the members the slot's bundle lists (its cluster.env)."""
    cluster_env = next((data for target, _, data in cloudboot.read_bundle(files) if str(target) == ClusterEnv.PATH),
                       None)
    if cluster_env is None:
        raise ContractError(f"the slot's bundle has no {ClusterEnv.PATH}")
    return reconcile.peers(parse_env_text(cluster_env.decode()).get(env_name(ClusterEnv, "members"), ""))


def follow_membership(client: ClusterEnv, files: str) -> None:
    """Members the slot's bundle no longer lists leave etcd, as `etcd-reconcile-members` makes them leave on bare
    metal: a cloud deletes a dropped slot's group, and nothing else would remove its member, which then counts as a
    dead voter (a 5 -> 3 shrink would leave 3 of 5 voters, tolerating no failure) and fails every health gate. Only
    a current member acts: a dropped slot's machine keeps its old bundle, which still lists every member."""
    listed = Etcdctl.of(client).members(list(client.client_endpoints)) or []
    if not any(client.peer_url in m.peer_urls for m in listed):
        log("this machine is no member now: the members follow the stack's membership")
        return
    wanted = bundle_members(files)
    if client.peer_url not in wanted.values():  # an empty or foreign list would remove every other member
        raise ContractError(f"the slot's bundle does not list this member ({client.peer_url}): nothing removed")
    reconcile.follow(client, wanted)


def watch_membership(env: BootEnv, slot: SlotEnv) -> int:
    """`--membership`, every MEMBERSHIP_WATCH_SECONDS on a cloud member: when a voter is silent and the slot's bundle
    dropped a listed member, the dropped leave now, under the lock, rather than at the next refresh. While every
    voter answers it reads no secret and takes no lock; it applies nothing else (the refresh does)."""
    client = load_env(ClusterEnv)
    view = ClusterView(client, Etcdctl.of(client))
    if not view.fetch(list(client.client_endpoints)):
        return 0
    view.probe_health()
    if not (silent := view.silent_voters()):
        return 0
    dropped = reconcile.leavers(view.members, bundle_members(read_secret(env, slot.name)))
    names = ", ".join(m.name or m.hex_id for m in silent)
    if not dropped:
        print(f"silent voters: {names}; the slot's bundle lists every member: nothing to remove")
        return 0
    log(f"silent voters: {names}; the slot's bundle drops {', '.join(m.name or m.hex_id for m in dropped)}: "
        "they leave now")
    with rollout_lock(env, client):
        follow_membership(client, read_secret(env, slot.name))  # the newest, as the refresh reads it
    return 0


def rollout_lock(env: BootEnv, client: ClusterEnv) -> contextlib.AbstractContextManager[None]:
    """The lock member replacements take; a refresh waits in line for it until the next run."""
    waits = dataclasses.replace(client, lock_wait_seconds=env.refresh_seconds)
    return replacement_lock(waits, Etcdctl.of(client), list(client.client_endpoints))


def apply(env: BootEnv, client: ClusterEnv, files: str, before: SlotEnv) -> None:
    """Under the lock: unpack, install, restart what reads a changed file; healthy before and after."""
    if "etcd" in env.roles:
        ctl = Etcdctl.of(client)
        lifecycle.await_voters_healthy(client, ctl, READY_SECONDS)
        if any(m.learner for m in ctl.members(client.client_endpoints) or ()):
            raise Abort(5, "a member is joining as a learner: this machine refreshes after its promotion")
    pods = Path(STATIC_PODS_STARTED)
    if "apiserver" in env.roles and not pods.is_file():  # in /run: the first refresh since boot placed the files
        write_atomic(pods, kubelet_fingerprint(before.kubelet_install))
    if changed := cloudboot.unpack_slot(files):
        systemd.act("daemon-reload")
    after = load_env(SlotEnv)
    if install.version_of([str(install.BIN / "etcd"), "--version"], install.ETCD_VERSION) != after.etcd_install[1]:
        # A new release: the running etcd is not what a start would run, so its start record goes and it restarts.
        Path(client.started_config_file).unlink(missing_ok=True)
    install.etcd(list(after.etcd_install))
    if "etcd" in env.roles:
        lifecycle.rolling_restart([])  # only if what etcd reads at start changed; waits until every voter is healthy
        cloudboot.start_delta_log(changed)
        cloudboot.start_membership_watch()
    if "apiserver" in env.roles and pods.read_text() != (now := kubelet_fingerprint(after.kubelet_install)):
        install.kubelet(list(after.kubelet_install))
        restart_static_pods()
        await_readyz(cloudboot.node_address(), READY_SECONDS)
        write_atomic(pods, now)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host cloud-refresh", description=__doc__.splitlines()[0])
    parser.add_argument("--membership", action="store_true",
                        help="only this: when a voter is silent, remove the members the slot's bundle drops")
    args = parser.parse_args(argv)
    env, slot = load_env(BootEnv), load_env(SlotEnv)  # the slot boot unpacked: a machine keeps it for life
    try:
        return watch_membership(env, slot) if args.membership else refresh(env, slot)
    except CloudError as error:  # a bundle that does not unpack
        raise Abort(1, str(error)) from None


def refresh(env: BootEnv, slot: SlotEnv) -> int:
    programs, files = fetch(env, slot.name)
    applied = Path(REFRESH_APPLIED)
    if applied.is_file() and applied.read_text().strip() == digest(programs, files):
        print("the bundles are the ones applied last: nothing to do")
        return 0
    if cloudboot.unpack(programs):
        log("a new agent build: it restarts the agent's services that run and applies the slot's bundle")
        systemd.restart_agent_services([])
        os.execv(AGENT, [AGENT, "cloud-refresh"])
    client = etcd_client(env, slot)
    with rollout_lock(env, client):
        log("new bundles; holding the rollout lock")
        files = read_secret(env, slot.name)  # the newest: the wait for the lock may outlast a `pulumi up`
        if "etcd" in env.roles:
            follow_membership(client, files)
        apply(env, client, files, slot)
        write_atomic(applied, digest(programs, files) + "\n")
    log("applied the new bundles")
    return 0
