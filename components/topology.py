"""Where each control-plane role runs: machines, zones and quorum arithmetic.

Pure and provider-neutral: validation, the report and every target read the same
placement, so "which zone holds which etcd member" is decided in one place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from components.config import ClusterConfig
from components.naming import machine_name


@dataclass(frozen=True)
class Machine:
    """One control-plane machine (or, on the clouds, one slot that a group keeps filled)."""

    name: str
    zone: str
    roles: frozenset[str]
    address: str | None = None

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Topology:
    machines: tuple[Machine, ...]
    spares: tuple[Machine, ...]
    zones: tuple[str, ...]

    def with_role(self, role: str) -> tuple[Machine, ...]:
        return tuple(m for m in self.machines if m.has(role))

    @property
    def etcd_members(self) -> tuple[Machine, ...]:
        return self.with_role("etcd")

    @property
    def api_servers(self) -> tuple[Machine, ...]:
        return self.with_role("apiserver")

    @property
    def load_balancers(self) -> tuple[Machine, ...]:
        return self.with_role("loadbalancer")

    def count_per_zone(self, role: str) -> Counter[str]:
        return Counter(m.zone for m in self.with_role(role))


def quorum(members: int) -> int:
    """etcd needs a strict majority of voting members to commit a write."""
    return members // 2 + 1


def fault_tolerance(members: int) -> int:
    return members - quorum(members)


def plan(cfg: ClusterConfig) -> Topology:
    """Place roles on machines: the listed hosts on bare metal, round-robin over zones on clouds."""
    if cfg.baremetal is not None and cfg.target == "baremetal":
        machines = tuple(
            Machine(h.name, h.zone, frozenset(h.roles), h.address) for h in cfg.baremetal.hosts
        )
        spares = tuple(
            Machine(s.name, s.zone, frozenset({"etcd"}), s.address) for s in cfg.baremetal.spares
        )
        return Topology(machines, spares, tuple(cfg.zones))
    return Topology(_cloud_machines(cfg), (), tuple(cfg.zones))


def _cloud_machines(cfg: ClusterConfig) -> tuple[Machine, ...]:
    zones = cfg.zones
    if cfg.etcd.placement == "colocated":
        return tuple(
            Machine(machine_name(cfg.cluster_name, "cp", i), zones[i % len(zones)],
                    frozenset({"etcd", "apiserver"}))
            for i in range(cfg.etcd.members)
        )
    etcd = tuple(
        Machine(machine_name(cfg.cluster_name, "etcd", i), zones[i % len(zones)],
                frozenset({"etcd"}))
        for i in range(cfg.etcd.members)
    )
    api = tuple(
        Machine(machine_name(cfg.cluster_name, "api", i), zones[i % len(zones)],
                frozenset({"apiserver"}))
        for i in range(cfg.api_servers.count)
    )
    return etcd + api
