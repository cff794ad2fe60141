"""A short, plain statement of what the configured control plane survives.

Exported as a stack output so `pulumi preview` shows it; `minimal` stacks say plainly
what they give up.
"""

from __future__ import annotations

from components.config import ClusterConfig
from components.topology import Topology, fault_tolerance, quorum


def zone_loss_survived(topology: Topology) -> bool:
    """Losing any single zone leaves an etcd quorum and at least one API server."""
    members = len(topology.etcd_members)
    etcd_ok = all(members - n >= quorum(members) for n in topology.count_per_zone("etcd").values())
    api_total = len(topology.api_servers)
    api_ok = all(api_total - n >= 1 for n in topology.count_per_zone("apiserver").values())
    return len(topology.zones) > 1 and etcd_ok and api_ok


def resilience_summary(cfg: ClusterConfig, topology: Topology) -> str:
    members, apis = len(topology.etcd_members), len(topology.api_servers)
    tolerance = fault_tolerance(members)
    lines = [
        f"etcd: {members} member(s), quorum {quorum(members)}, survives the loss of {tolerance} member(s).",
        f"API servers: {apis}, survives the loss of {apis - 1}.",
        ("zones: " + ", ".join(topology.zones) + (
            "; the loss of any one zone is survived." if zone_loss_survived(topology)
            else "; the loss of a zone is NOT survived.")),
        f"backups: every {cfg.backup.interval_minutes} min, keep {cfg.backup.retain.recent} recent "
        f"and {cfg.backup.retain.daily} daily, verified by restore: {cfg.backup.verify}.",
    ]
    if tolerance == 0 or apis == 1:
        lines.append("WARNING (resilience: minimal): a single machine failure stops the control plane "
                     "until it is replaced or restored from backup.")
    return "\n".join(lines)
