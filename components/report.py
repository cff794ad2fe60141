"""A Markdown resilience report for one stack (what a config change does to etcd: components/rollout.py).

Pure and provider-neutral (no Pulumi, no providers): the same text is a stack output (so
`pulumi preview` shows it), what `scripts/report` prints, and what the preview workflow puts
in a pull request's summary. Every figure is derived from the validated config and
`topology.plan`, the placement the targets use, so the report cannot drift from what the
program declares. Statements that are not derived say what they rest on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime

from components.config import ClusterConfig
from components.render.etcd import CLIENT_PORT, METRICS_PORT
from components.render.kubernetes import API_PORT
from components.render.loadbalancer import ADVERT_INTERVAL_SECONDS
from components.topology import Machine, Topology, fault_tolerance, plan, quorum

BACKUP_STATUS_KEYS = ("last_snapshot", "last_success", "last_verified", "last_failure", "last_failure_reason")


def resilience_report(cfg: ClusterConfig, status: Mapping[str, str] | None = None,
                      now: datetime | None = None) -> str:
    """The whole report. Without `status` it states no times, so the stack output stays
    stable between previews; `now` (UTC) is only needed to age a status file's times."""
    topology = plan(cfg)
    sections = [
        f"# Resilience report: {cfg.cluster_name} ({cfg.target}, resilience: {cfg.resilience})",
        _survival_summary(cfg, topology),
        _minimal(cfg, topology),
        "## Failure domains\n\n" + _failure_domain_table(cfg, topology),
        "## etcd members lost at once\n\n" + _member_loss_table(cfg, len(topology.etcd_members)),
        "## Load balancers and health checks\n\n" + _load_balancing(cfg, topology),
        "## Backups, RPO and RTO\n\n" + _backups(cfg, status, now),
        "## Control plane\n\n" + mermaid_diagram(cfg, topology),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _broken(cfg: ClusterConfig, topology: Topology, lost: set[Machine]) -> list[str]:
    """Why the control plane stops once `lost` is gone; an empty list means it keeps working."""
    def left(role: str) -> int:
        return sum(1 for m in topology.with_role(role) if m not in lost)

    members, reasons = len(topology.etcd_members), []
    if left("etcd") < quorum(members):
        reasons.append(f"etcd quorum lost ({left('etcd')} of {members} left, {quorum(members)} needed)")
    if left("apiserver") == 0:
        reasons.append("no API server left")
    if cfg.target == "baremetal" and left("loadbalancer") == 0:
        reasons.append("no load balancer left to hold the API VIP")
    return reasons


def _zone_losses(cfg: ClusterConfig, topology: Topology) -> dict[str, list[str]]:
    return {zone: _broken(cfg, topology, {m for m in topology.machines if m.zone == zone})
            for zone in topology.zones}


def _machine_losses(cfg: ClusterConfig, topology: Topology) -> dict[Machine, list[str]]:
    return {m: _broken(cfg, topology, {m}) for m in topology.machines}


def _survival_summary(cfg: ClusterConfig, topology: Topology) -> str:
    members = len(topology.etcd_members)
    fatal_machines = [m.name for m, why in _machine_losses(cfg, topology).items() if why]
    lines = ["## What this control plane survives", ""]
    lines.append("- Any one machine: " + (
        "survived." if not fatal_machines
        else f"**NOT survived**: losing {', '.join(fatal_machines)} stops the control plane."))
    lines.append("- " + zone_loss_statement(cfg, topology))
    lines.append(f"- etcd: {members} member(s), quorum {quorum(members)}, fault tolerance "
                 f"{fault_tolerance(members)} (members that can be lost at once while writes go on).")
    apis = len(topology.api_servers)
    lines.append(f"- API servers: {apis}, " + (f"any {apis - 1} can be lost." if apis > 1 else "none can be lost."))
    return "\n".join(lines)


def zone_loss_statement(cfg: ClusterConfig, topology: Topology) -> str:
    """One plain sentence; a single-zone stack must never read as zone-resilient."""
    if len(topology.zones) == 1:
        return (f"**Zone loss is NOT survived**: this stack has one zone ({topology.zones[0]}), so losing it "
                "loses every etcd member and API server: the control plane is down until the zone returns or "
                "etcd is restored from backup in another zone.")
    fatal = {zone: why for zone, why in _zone_losses(cfg, topology).items() if why}
    if fatal:
        zone, why = next(iter(fatal.items()))
        return f"**Zone loss is NOT survived**: losing zone {zone} stops the control plane ({'; '.join(why)})."
    return f"Any one zone of {', '.join(topology.zones)}: survived (no zone holds an etcd quorum)."


def _minimal(cfg: ClusterConfig, topology: Topology) -> str:
    """`resilience: minimal` trades failures for machines; say which ones, in this stack's terms."""
    if cfg.resilience != "minimal":
        return ""
    given_up = [f"the loss of {m.name} ({', '.join(sorted(m.roles))}): {'; '.join(why)}"
                for m, why in _machine_losses(cfg, topology).items() if why]
    given_up += [f"the loss of zone {zone}: {'; '.join(why)}"
                 for zone, why in _zone_losses(cfg, topology).items() if why and len(topology.zones) > 1]
    if not given_up:
        return ("## resilience: minimal\n\nminimal allows smaller sizes, but this stack does not use them: "
                "it still survives any one machine.")
    lines = ["## resilience: minimal: what this stack no longer survives", ""]
    lines += [f"- {item}" for item in given_up]
    lines.append("\nUntil the machine is replaced or etcd is restored from backup, the control plane is down.")
    return "\n".join(lines)


def _verdict(why: list[str]) -> str:
    return "survives" if not why else "**STOPS**: " + "; ".join(why)


def _left(cfg: ClusterConfig, topology: Topology, lost: set[Machine]) -> str:
    def left(role: str) -> int:
        return sum(1 for m in topology.with_role(role) if m not in lost)

    lbs = f" / {left('loadbalancer')}" if cfg.target == "baremetal" else ""
    return f"{left('etcd')} / {left('apiserver')}{lbs}"


def _holds(machines: list[Machine]) -> str:
    counts = {role: sum(1 for m in machines if m.has(role)) for role in ("etcd", "apiserver", "loadbalancer")}
    return ", ".join(f"{role} x{n}" for role, n in counts.items() if n) or "nothing"


def _failure_domain_table(cfg: ClusterConfig, topology: Topology) -> str:
    lbs = " / LBs" if cfg.target == "baremetal" else ""
    rows = [f"| failure domain | runs | left after its loss: etcd / API{lbs} | control plane |",
            "| --- | --- | --- | --- |"]
    for zone, why in _zone_losses(cfg, topology).items():
        in_zone = [m for m in topology.machines if m.zone == zone]
        rows.append(f"| zone {zone} | {_holds(in_zone)} | {_left(cfg, topology, set(in_zone))} | {_verdict(why)} |")
    for machine, why in _machine_losses(cfg, topology).items():
        where = f"{machine.name} ({machine.address}, {machine.zone})" if machine.address \
            else f"{machine.name} ({machine.zone})"
        rows.append(f"| machine {where} | {_holds([machine])} | {_left(cfg, topology, {machine})} "
                    f"| {_verdict(why)} |")
    for spare in topology.spares:
        rows.append(f"| spare {spare.name} ({spare.address}, {spare.zone}) | standby etcd | "
                    f"{_left(cfg, topology, set())} | survives (no spare left to take over a member) |")
    if cfg.baremetal is not None:
        rows.append(f"| backup host {cfg.baremetal.backup_host.address} | snapshots | "
                    f"{_left(cfg, topology, set())} | survives; backups fail loudly and its history is lost |")
    return "\n".join(rows) + "\n\n" + _replacement_note(cfg)


def _replacement_note(cfg: ClusterConfig) -> str:
    """The table shows the state until a lost machine is back; say what brings it back."""
    if cfg.baremetal is not None:
        bm = cfg.baremetal
        unpinned = [h.name for h in (*bm.hosts, *bm.spares) if not h.host_key]
        unpinned += [] if bm.backup_host.host_key else ["the backup host"]
        keys = (f"SSH host keys: **trust on first use** for {', '.join(unpinned)} (baremetal.trustOnFirstUse, no "
                "hostKey): each is pinned to the key it reported at its first contact (`pulumi up`; for the backup "
                "host also the first backup), which nothing verified: pin them (hostKey) from a trusted source."
                if unpinned else "SSH host keys: all pinned (hostKey), so a replaced machine needs its new key in the "
                "stack before `pulumi up` can reach it.")
        return ("Nothing recreates a bare-metal machine: a spare takes over a dead etcd member after "
                f"{bm.spare_takeover_after_seconds} s, the operator replaces the rest. {keys}")
    return {"gce": "A lost machine is recreated by its managed instance group (autohealing).",
            "aws": "A lost machine is recreated by its Auto Scaling group."}[cfg.target]


def _member_loss_table(cfg: ClusterConfig, members: int) -> str:
    """Quorum per number of member machines lost together; what brings it back depends on the disk."""
    if cfg.etcd.disk == "persistent":
        lost_quorum = ("**LOST**: writes stop until the groups recreate the machines and re-attach their disks "
                       "(no data lost); a lost disk means a restore from backup (`scripts/etcd-restore`)")
    else:
        lost_quorum = "**LOST**: writes stop; the data went with the machines: restore from backup " \
                      "(`scripts/etcd-restore`)"
    rows = [f"| etcd members lost at once | members left | quorum (needs {quorum(members)}) |",
            "| --- | --- | --- |"]
    for lost in range(1, members + 1):
        left = members - lost
        rows.append(f"| {lost} | {left} | {'kept' if left >= quorum(members) else lost_quorum} |")
    return "\n".join(rows)


def _disk_design(cfg: ClusterConfig) -> str:
    if cfg.etcd.disk == "persistent":
        return ("etcd data on a persistent disk that the replacement machine re-attaches: a member's state "
                "survives even if every other member is down.")
    return ("etcd data on local disk, lost with the machine: a replacement rejoins as a learner and copies "
            "the state from the other members (runtime reconfiguration), which needs their quorum.")


def _lb_baremetal(cfg: ClusterConfig, topology: Topology) -> list[str]:
    bm = cfg.baremetal
    vip = bm.api_vip if bm else "?"
    holders = ", ".join(m.name for m in topology.load_balancers)
    return [
        f"- API: HAProxy on {holders}, behind the keepalived VIP {vip}:{API_PORT} (VRRP advertisement every "
        f"{ADVERT_INTERVAL_SECONDS} s, so a dead holder is replaced in about {3 * ADVERT_INTERVAL_SECONDS} s; "
        "the VIP also moves when the holder's HAProxy stops).",
        "- API health check: HTTPS `GET /readyz` on every API server every 2 s; 2 failures take it out.",
        f"- etcd clients: HAProxy on {vip}:{CLIENT_PORT}, TLS passed through, `balance source` "
        "(source affinity: a client stays on one member).",
        f"- etcd health check: plain HTTP `GET /health` on port {METRICS_PORT} (no keys exposed).",
        "- Machine replacement: none automatic; spares take over etcd members, the operator the rest.",
    ]


def _lb_gce(cfg: ClusterConfig, topology: Topology) -> list[str]:
    return [
        f"- API: external TCP load balancer on port {API_PORT} in front of a regional managed instance group "
        f"over {', '.join(topology.zones)}.",
        "- API health check: HTTPS `GET /readyz`; the groups autoheal (recreate) a machine that fails it.",
        f"- etcd clients: internal TCP load balancer on port {CLIENT_PORT} with session affinity CLIENT_IP.",
        f"- etcd health check: plain HTTP `GET /health` on port {METRICS_PORT}.",
        "- Machine replacement: each etcd member is an autohealing managed instance group of one.",
    ]


def _lb_aws(cfg: ClusterConfig, topology: Topology) -> list[str]:
    return [
        f"- API: Network Load Balancer on port {API_PORT} over {', '.join(topology.zones)}; the API servers' "
        "Auto Scaling group uses health check type ELB, so a server the NLB marks unhealthy is replaced.",
        "- API health check: HTTPS `GET /readyz` (NLB target group).",
        f"- etcd clients: an NLB on port {CLIENT_PORT} with source-IP stickiness.",
        f"- etcd health check: plain HTTP `GET /health` on port {METRICS_PORT}.",
        "- Machine replacement: each etcd member is an Auto Scaling group of one.",
    ]


_LB_DESIGN: dict[str, Callable[[ClusterConfig, Topology], list[str]]] = {
    "baremetal": _lb_baremetal, "gce": _lb_gce, "aws": _lb_aws}


def _load_balancing(cfg: ClusterConfig, topology: Topology) -> str:
    lines = _LB_DESIGN[cfg.target](cfg, topology)
    lines.append(f"- {_disk_design(cfg)}")
    lines.append(f"- etcd leader loss: a new leader after about the election timeout "
                 f"({cfg.etcd.election_ms} ms; heartbeat {cfg.etcd.heartbeat_ms} ms).")
    return "\n".join(lines)


def _backup_store(cfg: ClusterConfig) -> str:
    if cfg.baremetal is not None:
        host = cfg.baremetal.backup_host
        return f"backup host {host.user}@{host.address}:{host.path}/{cfg.cluster_name}"
    return {"gce": "a versioned GCS bucket", "aws": "a versioned S3 bucket"}[cfg.target]


def _minutes_before(stamp: str, now: datetime | None) -> int | None:
    """Age of one of the status file's `date -u +%Y-%m-%dT%H:%M:%SZ` stamps; None if unknown."""
    try:
        then = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None
    return None if now is None else int((now - then).total_seconds() // 60)


def _age(stamp: str, now: datetime | None) -> str:
    minutes = _minutes_before(stamp, now)
    if minutes is None:
        return stamp
    if minutes < 120:
        return f"{stamp} ({minutes} min ago)"
    return f"{stamp} ({minutes // 60} h ago)" if minutes < 48 * 60 else f"{stamp} ({minutes // 1440} days ago)"


def _delta_log(cfg: ClusterConfig) -> str:
    where = "the backup host" if cfg.baremetal is not None else "the backup bucket (deltas/<cluster ID>/)"
    return (f"every revision written, shipped by the raft leader every {cfg.backup.delta_seconds} s "
            f"(backup.deltaSeconds) to {where}; a restore replays it onto the snapshot, up to the newest revision or "
            "`--until`")


def _rpo_target(cfg: ClusterConfig) -> str:
    return f"{cfg.backup.delta_seconds} s + 2 s (= backup.deltaSeconds, the delta log)"


def _backup_status(cfg: ClusterConfig, status: Mapping[str, str] | None, now: datetime | None) -> list[str]:
    if status is None:
        return ["- Last verified snapshot: not known here (the backup job's `status.json`, "
                "see docs/backups.md; `scripts/report STACK --status FILE` shows it)."]
    verified = status.get("last_verified")
    lines = [f"- Last verified snapshot: {_age(verified, now) if verified else '**none recorded**'}"
             f" ({status.get('last_snapshot', 'no snapshot name')})."]
    minutes = _minutes_before(verified, now) if verified else None
    if minutes is not None and minutes > 2 * cfg.backup.interval_minutes:
        lines.append(f"- **Stale**: the newest verified snapshot is older than two intervals "
                     f"({2 * cfg.backup.interval_minutes} min): the RPO target is not being met.")
    delta = status.get("last_delta_at")
    lines.append(f"- Delta log archived through revision {status.get('last_delta_revision', '?')} as of "
                 f"{_age(delta, now)}." if delta else "- Delta log: **nothing archived yet**.")
    failure = status.get("last_failure")
    if failure and failure > status.get("last_success", ""):
        lines.append(f"- **Last run failed** at {_age(failure, now)}: {status.get('last_failure_reason', '?')}.")
    return lines


def _backups(cfg: ClusterConfig, status: Mapping[str, str] | None, now: datetime | None) -> str:
    b = cfg.backup
    lines = [
        f"- Snapshots every {b.interval_minutes} min (by the raft leader) to {_backup_store(cfg)}.",
        f"- Retention: the newest {b.retain.recent} snapshots plus the first of each of the newest "
        f"{b.retain.daily} UTC days.",
        f"- Verified by restoring each into a throwaway etcd: {'yes' if b.verify else '**no** (backup.verify)'}.",
        f"- Delta log: {_delta_log(cfg)}.",
        *_backup_status(cfg, status, now),
        f"- RPO target: {_rpo_target(cfg)}, for a loss of quorum; "
        f"0 for up to {fault_tolerance(cfg.etcd.members)} lost member(s) (every committed write is on a quorum).",
        "- RTO target, up to the fault tolerance: no outage (HA); full redundancy returns when the lost "
        "machine is replaced (see failure domains).",
        "- RTO target, quorum lost: the time `scripts/etcd-restore` takes to bring every member back from the "
        "newest verified snapshot, as measured by the DR drill (`scripts/dr-drill`, `rto_seconds`); the integration "
        "tests bound it against the same work done by hand (1.25 x at 100 MB, 1.1 x at 1 GB). The restored revision "
        "is moved 10^9 past the snapshot's, so watchers list again instead of missing events (docs/backups.md).",
    ]
    return "\n".join(lines)


def _node_id(kind: str, name: str) -> str:
    return f"{kind}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def mermaid_diagram(cfg: ClusterConfig, topology: Topology) -> str:
    """LB -> API servers -> etcd members, grouped by zone, and where snapshots go."""
    api_lb = {"baremetal": f"API VIP {cfg.baremetal.api_vip if cfg.baremetal else ''}:{API_PORT}<br/>"
                           "HAProxy + keepalived",
              "gce": f"external TCP LB :{API_PORT}", "aws": f"NLB :{API_PORT}"}[cfg.target]
    etcd_lb = {"baremetal": f"HAProxy :{CLIENT_PORT}<br/>source affinity",
               "gce": f"internal TCP LB :{CLIENT_PORT}<br/>CLIENT_IP affinity",
               "aws": f"etcd NLB :{CLIENT_PORT}<br/>source-IP stickiness"}[cfg.target]
    lines = ["```mermaid", "flowchart TB", '  clients(["kubectl, kubelets, controllers"]) --> api_lb',
             f'  api_lb(["{api_lb}<br/>health: /readyz"])',
             f'  etcd_lb(["{etcd_lb}<br/>health: /health :{METRICS_PORT}"])',
             f'  backups[("{_backup_store(cfg)}")]']
    for zone in topology.zones:
        lines.append(f'  subgraph {_node_id("zone", zone)}["zone {zone}"]')
        for m in (m for m in topology.machines if m.zone == zone):
            if m.has("apiserver"):
                lines.append(f'    {_node_id("api", m.name)}["{m.name}: kube-apiserver"]')
            if m.has("etcd"):
                lines.append(f'    {_node_id("etcd", m.name)}[("{m.name}: etcd")]')
        for s in (s for s in topology.spares if s.zone == zone):
            lines.append(f'    {_node_id("spare", s.name)}["{s.name}: spare etcd"]')
        lines.append("  end")
    apis = " & ".join(_node_id("api", m.name) for m in topology.api_servers)
    members = " & ".join(_node_id("etcd", m.name) for m in topology.etcd_members)
    lines += [f"  api_lb --> {apis}", f"  {apis} -->|TLS, every member| {members}",
              f"  etcd_lb --> {members}",
              f"  {members} -.->|leader snapshots every {cfg.backup.interval_minutes} min| backups",
              "```"]
    return "\n".join(lines)
