"""The host firewall (nftables): each control-plane port open only to the hosts that need it.

2379 (etcd clients) to API servers, load balancers, the backup host and etcd members or
spares (member recovery talks to its peers); 2380 (etcd peers) to members and spares;
2381 (etcd health) to load balancers; 2381 and 2382 (etcd's and the agent's metrics) to the
monitoring ranges (`baremetal.monitoringCidrs`, none by default); 6443 to admins, VIP holders and
cluster hosts; SSH to the operators' range. Everything else is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from components.render.etcd import METRICS_PORT
from components.render.templating import render
from kcp_host.contract import ClusterEnv


@dataclass(frozen=True)
class FirewallPeers:
    operators: tuple[str, ...]
    admins: tuple[str, ...]
    api_servers: tuple[str, ...]
    load_balancers: tuple[str, ...]
    etcd_members: tuple[str, ...]  # members and spares
    backup_hosts: tuple[str, ...]
    cluster_hosts: tuple[str, ...]
    monitoring: tuple[str, ...] = ()  # Prometheus: etcd's metrics (2381) and the agent's (2382)


def _unique(*groups: Iterable[str]) -> list[str]:
    return sorted({address for group in groups for address in group})


RULES = "/etc/kcp/firewall.nft"
NEW_RULES = f"{RULES}.new"  # `kcp-host firewall-apply` moves it into place once it is safe to load
UNIT = "/etc/systemd/system/kcp-firewall.service"


def firewall_unit() -> str:
    """Loads the kcp table at every boot, after Debian's nftables.service (which flushes the ruleset)."""
    return (
        "# Rendered by resilient-control-plane: the control-plane host firewall (the kcp table only).\n"
        "[Unit]\n"
        "Description=Control-plane host firewall (nftables table inet kcp)\n"
        "DefaultDependencies=no\n"
        "Wants=network-pre.target\n"
        "Before=network-pre.target\n"
        "After=nftables.service\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart=/usr/sbin/nft -f {RULES}\n"
        "ExecStop=/usr/sbin/nft delete table inet kcp\n"
        "\n"
        "[Install]\n"
        "WantedBy=sysinit.target\n"
    )


def nftables_config(p: FirewallPeers) -> str:
    sets = {
        "operators": _unique(p.operators),
        "etcd_clients": _unique(p.api_servers, p.load_balancers, p.backup_hosts, p.etcd_members),
        "etcd_peers": _unique(p.etcd_members),
        "load_balancers": _unique(p.load_balancers),
        "api_servers": _unique(p.api_servers),
        "api_clients": _unique(p.admins, p.load_balancers, p.cluster_hosts),
        "monitoring": _unique(p.monitoring),
    }
    return render("nftables.conf.j2", sets=sets, metrics_ports=(METRICS_PORT, ClusterEnv.metrics_port))
