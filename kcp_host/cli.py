"""`kcp-host SUBCOMMAND [ARGS]`: one entry point, one subcommand per host program.

Subcommands keep the names of the programs they replaced, so units, journal lines and
operators' habits stay the same: `kcp-host etcd-member-recovery` logs
`etcd-member-recovery: ...`. Each subcommand module is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

from kcp_host.contract import ContractError
from kcp_host.log import Abort, log, set_program

# subcommand -> (module:function, what it does)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "etcd-member-recovery": ("recovery:main", "before every etcd start: start, bootstrap, rejoin or refuse"),
    "etcd-member-promote": ("promote:main", "after every etcd start: record the member ID, promote a learner"),
    "etcd-spare-watch": ("spare:main", "on spares: take over the slot of a long-dead member"),
    "etcd-member-leave": ("lifecycle:leave", "remove this member when its host leaves the stack"),
    "etcd-reconcile-members": ("reconcile:main", "remove members the stack no longer lists, from a host that stays"),
    "etcd-wait-healthy": ("lifecycle:wait_healthy", "wait until every configured member is healthy"),
    "etcd-rolling-restart": ("lifecycle:rolling_restart", "restart this member only while the rest keep quorum"),
    "firewall-apply": ("firewall:main", "load the shipped firewall unless it would cut the program off"),
    "etcd-backup": ("backup:main", "the backup timer's job: leader-only verified snapshot, upload"),
    "etcd-maintain": ("maintain:main", "defragment one member at a time, watch the quota, recover from NOSPACE"),
    "metrics": ("metrics:main", "backups, drills, takeovers, membership, certificates: Prometheus file, server, JSON"),
    "etcd-delta-archive": ("archive:main", "the leader's delta log: a chunk of revisions every few seconds"),
    "etcd-delta-replay": ("replay:main", "a snapshot plus archived revisions, replayed and checked, as one snapshot"),
    "etcd-backup-verify": ("verify:main", "restore a snapshot into a throwaway etcd and compare"),
    "etcd-backup-receive": ("receiver:main", "the backup host's forced command: add files, never replace"),
    "backup-host-setup": ("receiver:setup", "prepare the backup host's user and folder"),
    "etcd-restore-member": ("restore_member:main", "one member's steps of scripts/etcd-restore"),
    "etcd-install": ("install:etcd", "install a pinned etcd release, or the distribution's"),
    "kubelet-install": ("install:kubelet", "install containerd, runc, crictl and the kubelet, pinned"),
    "static-pods-restart": ("staticpods:main", "bare metal: restart the API server's static pods after a change"),
    "restart-agent-services": ("systemd:restart_agent_services", "after a new build: restart what runs the old one"),
    "cloud-boot": ("cloudboot:main", "the boot path of GCE and AWS machines"),
    "cloud-refresh": ("refresh:main", "the refresh timer's job: apply changed bundles, one machine at a time"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in SUBCOMMANDS.items())
    return f"usage: kcp-host SUBCOMMAND [ARGS]   (SUBCOMMAND --help for its own)\n{rows}\n"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"kcp-host: unknown subcommand {name!r}\n{usage()}", end="", file=sys.stderr)
        return 2
    set_program(name)
    module, _, function = SUBCOMMANDS[name][0].partition(":")
    run = getattr(importlib.import_module(f"kcp_host.{module}"), function)
    try:
        code: int = run(args)
    except Abort as stop:
        log(f"ERROR: {stop}")
        return stop.code
    except ContractError as error:
        log(f"ERROR: {error}")
        return 2
    return code
