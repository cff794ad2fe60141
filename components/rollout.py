"""What a stack change does to etcd: the membership change, and the rollout steps in order.

For a pull request's preview (`scripts/report STACK --old-config FILE`): members added, removed,
replaced or adopted, whether quorum is at risk, and every step that restarts or replaces a member,
in the order the program applies them, with the fault tolerance left while each step runs. Pure
and offline like components/report.py and derived from the same `topology.plan`; it states no
time, so the same change always reads the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.config import ClusterConfig
from components.topology import Machine, fault_tolerance, plan, quorum
from kcp_host.contract import MEMBERSHIP_WATCH, MEMBERSHIP_WATCH_SECONDS, BootEnv

REFRESH_MINUTES = BootEnv.__dataclass_fields__["refresh_seconds"].default // 60

# What etcd reads when it starts (its binary, etcd.env, its unit, its certificates): a change restarts every
# member, one at a time. The value says why, where the key alone does not.
RESTART_KEYS: dict[str, str] = {
    "clusterName": "", "etcd.version": "", "etcd.heartbeatMs": "", "etcd.electionMs": "",
    "pki.rotation": "new member certificates", "pki.leafValidityHours": "new member certificates",
}
# Keys that place members: what they do is the members added, removed and replaced themselves.
PLACEMENT_KEYS = frozenset({"zones", "etcd.members", "etcd.placement", "etcd.disk", "etcd.machineType",
                            "baremetal.hosts", "baremetal.spares"})
FIREWALL_KEYS = frozenset({"network.adminCidrs", "baremetal.operatorCidrs"})


def _flat(cfg: ClusterConfig) -> dict[str, Any]:
    """Every setting under its dotted stack key (`etcd.electionMs`); a list is one value, secrets stay masked."""
    def walk(key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            return {key: value}
        return {k: v for name, item in value.items() for k, v in walk(f"{key}.{name}" if key else name, item).items()}
    return walk("", cfg.model_dump(mode="json", by_alias=True))


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return "unset" if value is None else str(value)


def _members(cfg: ClusterConfig) -> dict[str, Machine]:
    """etcd members by name (a host on bare metal, a slot on the clouds), in the stack's host order."""
    return {m.name: m for m in plan(cfg).etcd_members}


def _where(m: Machine) -> str:
    return f"{m.name} ({m.address}, {m.zone})" if m.address else f"{m.name} ({m.zone})"


def _replacement(old: ClusterConfig, new: ClusterConfig, a: Machine, b: Machine) -> str | None:
    """Why a kept member loses its data or identity, if it does. On bare metal only the address (its peer
    URL) is its identity: a zone is a label there, the disk is always local and the machine the operator's."""
    if a.address != b.address:
        return f"address {a.address} -> {b.address} (new peer URL)"
    if new.target == "baremetal":
        return None
    if a.zone != b.zone:
        return f"zone {a.zone} -> {b.zone}"
    if old.etcd.disk != new.etcd.disk:
        return f"etcd.disk {old.etcd.disk} -> {new.etcd.disk}"
    if new.etcd.disk == "local" and old.etcd.machine_type != new.etcd.machine_type:
        return f"etcd.machineType {old.etcd.machine_type} -> {new.etcd.machine_type} (local data lost)"
    return None


@dataclass(frozen=True)
class MemberChange:
    """One reading of a change, shared by the membership section and the rollout steps."""

    target: str
    before: dict[str, Machine]  # the members now, in the old host order
    after: dict[str, Machine]  # the members after the change, in the new host order
    replaced: dict[str, str]  # kept member -> why it is removed and re-added
    adopted: dict[str, str]  # spare moved into hosts -> the member whose slot its takeover took
    settings: dict[str, tuple[Any, Any]]  # changed stack key -> (old, new)

    @property
    def added(self) -> list[Machine]:
        return [m for n, m in self.after.items() if n not in self.before and n not in self.adopted]

    @property
    def removed(self) -> list[Machine]:
        taken = set(self.adopted.values())
        return [m for n, m in self.before.items() if n not in self.after and n not in taken]

    @property
    def restart_reasons(self) -> list[str]:
        changed = {k: f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in self.settings.items()}
        return [f"{why}: {changed[k]}" if why else changed[k] for k, why in RESTART_KEYS.items() if k in changed]

    @property
    def rejoining(self) -> dict[str, str]:
        """Replaced members that leave with the removals and rejoin with the additions. Bare metal drops a
        replaced member's old peer URL before the configuration rolls (etcd-reconcile-members); on the clouds
        a group rebuilds its member in that member's turn."""
        return self.replaced if self.target == "baremetal" else {}

    @property
    def unrestarted(self) -> list[str]:
        """Changed keys that restart no member and place none."""
        return [f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in self.settings.items()
                if k not in RESTART_KEYS and k not in PLACEMENT_KEYS]


def classify(old: ClusterConfig, new: ClusterConfig) -> MemberChange:
    """A spare moved into hosts with its address is adopted: its takeover (docs/self-healing.md) already made it
    a voter in place of a dead member. Spares and the members the change drops are paired in host order."""
    before, after = _members(old), _members(new)
    spares = {s.name: s.address for s in plan(old).spares}
    takers = [n for n, m in after.items() if n not in before and spares.get(n, "") == m.address]
    dropped = [n for n in before if n not in after]
    kept = [n for n in after if n in before]
    replaced = {n: why for n in sorted(kept) if (why := _replacement(old, new, before[n], after[n]))}
    a, b = _flat(old), _flat(new)
    settings = {k: (a.get(k), b.get(k)) for k in a | b if a.get(k) != b.get(k)}
    return MemberChange(new.target, before, after, replaced, dict(zip(takers, dropped, strict=False)), settings)


def membership_change(old: ClusterConfig, new: ClusterConfig) -> str:
    """For a preview: members added, removed, replaced and adopted by this change, and whether quorum is at risk."""
    change = classify(old, new)
    added, removed = change.added, change.removed
    lines = ["## etcd membership change", ""]
    lines += [f"- added: {_where(m)}" for m in added]
    lines += [f"- removed: {_where(m)}" for m in removed]
    lines += [f"- replaced: {_where(change.before[n])}: {why}" for n, why in change.replaced.items()]
    lines += [f"- adopted: {_where(change.after[spare])} moves from spares to hosts in place of {dead}: its "
              f"takeover already made it a voter and removed {dead} (check that its takeover.json names {dead})"
              for spare, dead in change.adopted.items()]
    if not (added or removed or change.replaced):
        lines.append("No member is added, removed or replaced.")
        return "\n".join(lines)
    lines += ["", _quorum_verdict(len(change.before), len(change.after), len(removed), len(change.replaced))]
    return "\n".join(lines)


def _quorum_verdict(old_count: int, new_count: int, removed: int, replaced: int) -> str:
    """Members removed or replaced in one update are away together; count what stays."""
    gone = removed + replaced
    stays, needed = old_count - gone, quorum(old_count)
    risks = []
    if gone and stays < needed:
        risks.append(f"{gone} of {old_count} etcd members are replaced or removed at once; {stays} left, "
                     f"quorum needs {needed}")
    if new_count < needed:
        risks.append(f"shrinks from {old_count} to {new_count} members, below the old quorum of {needed}")
    if fault_tolerance(new_count) == 0 and fault_tolerance(old_count) > 0:
        risks.append(f"afterwards {new_count} member(s) tolerate no failure")
    if risks:
        return "**Quorum at risk**: " + "; ".join(risks) + \
            ". Apply it one member at a time, each after the cluster is healthy again."
    if not gone:
        return "Safe: no member is removed or replaced; new members join one at a time as learners."
    return (f"Safe: {gone} of {old_count} etcd member(s) replaced or removed at once; {stays} left, "
            f"quorum needs {needed}.")


@dataclass(frozen=True)
class Step:
    """One member leaving, restarting or joining; `tolerance`: further member failures the cluster survives
    while the step runs (negative: the step itself takes the quorum away)."""

    action: str
    state: str
    tolerance: int


def rollout(change: MemberChange) -> list[Step]:
    """Removals (old host order), then restarts (new host order), then additions; the voters follow each step. On the
    clouds the members removed are already down: the up deleted their machines."""
    rejoining = change.rejoining
    leaving = {m.name for m in change.removed} | rejoining.keys()
    joining = {m.name for m in change.added} | rejoining.keys()
    voters, steps = len(change.before), []
    dead = 0 if change.target == "baremetal" else len(leaving)  # the clouds' up deletes the machines first
    for name in [n for n in change.before if n in leaving]:
        voters, dead = voters - 1, max(0, dead - 1)
        why = f" (replaced: {rejoining[name]})" if name in rejoining else ""
        up = f", {voters - dead} up" if dead else ""
        steps.append(Step(f"remove {name}{why}", f"{voters} voters remain{up}", voters - dead - quorum(voters)))
    reasons = "; ".join(change.restart_reasons)
    for name in [n for n in change.after if n not in joining]:
        if name in change.replaced:
            steps.append(Step(f"replace {name} ({change.replaced[name]}; it rejoins as a learner)",
                              f"{voters - 1} voters while it rejoins", fault_tolerance(voters - 1)))
        elif reasons:
            steps.append(Step(f"restart {name} ({reasons})", f"{voters - 1} of {voters} voters up",
                              voters - 1 - quorum(voters)))
    for name in [n for n in change.after if n in joining]:
        back = " back" if name in rejoining else ""
        steps.append(Step(f"add {name}{back} as a learner, then promote it",
                          f"{voters} voters while it catches up ({voters + 1} once promoted)", fault_tolerance(voters)))
        voters += 1
    return steps


def _failures(n: int) -> str:
    return f"{n} more failure" + ("" if n == 1 else "s")


def _tolerates(n: int) -> str:
    return "**quorum lost**: writes stop until this step ends" if n < 0 else f"tolerates {_failures(n)}"


def _order(cfg: ClusterConfig) -> str:
    """Why the steps come in this order, and on the clouds who takes them."""
    if cfg.target == "baremetal":
        return ("Removals first, then restarts in host order, then additions, one member at a time: etcd's membership "
                "and the firewall follow the stack host by host before the configuration "
                "rolls (a member leaves from one that stays, leadership moved away first, only while the rest keep a "
                "healthy quorum), each restart waits until every voter is healthy again, and new members join last, as "
                "learners (no vote while they catch up) under a cluster-wide lock.")
    local = " With etcd.disk local a recreated member starts empty and rejoins as a learner." \
        if cfg.etcd.disk == "local" else ""
    return (f"On {cfg.target} the machines take these steps themselves, one at a time under a cluster-wide lock, each "
            f"only while every voter is healthy: every {REFRESH_MINUTES} minutes each machine's `kcp-cloud-refresh` "
            "fetches its new bundle and restarts if what etcd reads changed (in the order the machines get the lock, "
            "not host order); members the stack dropped are removed first, as soon as their machines are gone; a "
            f"new or rebuilt slot's machine joins as a learner as it boots and is promoted once caught up.{local}")


def _cloud_window(change: MemberChange) -> list[str]:
    """On the clouds the up deletes a dropped slot's machine before any member removes its member."""
    if change.target == "baremetal" or not change.removed:
        return []
    voters, gone = len(change.before), len(change.removed)
    return [f"**Until the staying members remove them** the dropped slots' machines are gone but still voters: "
            f"{voters - gone} of {voters} up, {_tolerates(voters - gone - quorum(voters))}. Each member's "
            f"`{MEMBERSHIP_WATCH}.timer` looks every {MEMBERSHIP_WATCH_SECONDS} s for a silent voter its new bundle "
            f"dropped, so this lasts about a minute; where no member has the watch yet (a member's first refresh "
            f"since the release that added it installs it), until the first refresh, up to about "
            f"{REFRESH_MINUTES + REFRESH_MINUTES // 5 + 1} minutes."]


def _closing(steps: list[Step], voters_after: int) -> str:
    low = min(s.tolerance for s in steps)
    at = [str(i) for i, s in enumerate(steps, 1) if s.tolerance == low]
    which = ("step " if len(at) == 1 else "steps ") + ", ".join(at)
    after = f"Afterwards: {voters_after} voters, fault tolerance {fault_tolerance(voters_after)}."
    if low < 0:
        return f"**Quorum is lost during {which}**: writes stop until each of them ends. {after}"
    return f"Lowest fault tolerance during the rollout: {_failures(low)} ({which}). {after}"


def _unrestarted(change: MemberChange) -> list[str]:
    lines = [f"Changed without restarting any member: {', '.join(change.unrestarted)}."] if change.unrestarted else []
    if change.target == "baremetal" and change.settings.keys() & FIREWALL_KEYS:
        lines.append("The firewall changes host by host, in host order; a change that would lock out the machine "
                     "running Pulumi is refused at the first host.")
    return lines


def rollout_steps(old: ClusterConfig, new: ClusterConfig) -> str:
    """For a preview: the steps that restart, remove, replace or add etcd members, in order, with the fault
    tolerance left during each, so that a reviewer sees the weakest moment before merging."""
    change = classify(old, new)
    lines = ["## Rollout steps", ""]
    stays = [n for n in change.after if n not in change.rejoining and (n in change.before or n in change.adopted)]
    steps = rollout(change)
    if not stays:
        lines.append("**No current member stays**: this is no rollout but a new cluster (it bootstraps empty); "
                     "the data moves only through a backup and `scripts/etcd-restore`.")
    elif not steps:
        lines.append("No member restarts or changes.")
    else:
        lines += [_order(new), ""]
        lines += [f"{i}. {s.action}: {s.state}, {_tolerates(s.tolerance)}" for i, s in enumerate(steps, 1)]
        lines += ["", _closing(steps, len(change.after))]
    notes = _cloud_window(change) + _unrestarted(change)
    return "\n".join([*lines, *([""] if notes else []), *notes])
