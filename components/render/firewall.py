"""The host firewall (nftables): each control-plane port open only to the hosts that need it.

2379 (etcd clients) to API servers, load balancers, the backup host and etcd members or
spares (member recovery talks to its peers); 2380 (etcd peers) to members and spares;
2381 (etcd health) to load balancers; 6443 to admins, VIP holders and cluster hosts;
SSH to the operators' range. Everything else is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from components.render.templating import render


@dataclass(frozen=True)
class FirewallPeers:
    operators: tuple[str, ...]
    admins: tuple[str, ...]
    api_servers: tuple[str, ...]
    load_balancers: tuple[str, ...]
    etcd_members: tuple[str, ...]  # members and spares
    backup_hosts: tuple[str, ...]
    cluster_hosts: tuple[str, ...]


def _unique(*groups: Iterable[str]) -> list[str]:
    return sorted({address for group in groups for address in group})


def nftables_config(p: FirewallPeers) -> str:
    sets = {
        "operators": _unique(p.operators),
        "etcd_clients": _unique(p.api_servers, p.load_balancers, p.backup_hosts, p.etcd_members),
        "etcd_peers": _unique(p.etcd_members),
        "load_balancers": _unique(p.load_balancers),
        "api_servers": _unique(p.api_servers),
        "api_clients": _unique(p.admins, p.load_balancers, p.cluster_hosts),
    }
    return render("nftables.conf.j2", sets=sets)
