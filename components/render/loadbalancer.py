"""HAProxy and keepalived for bare metal, where no cloud load balancer exists.

HAProxy on each load-balancer host spreads API traffic over every API server that
answers /readyz, and gives etcd clients source affinity to one healthy member (the
design's "etcd behind a load balancer with session affinity"). keepalived moves the
VIP to another load balancer when a holder dies or its HAProxy stops.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence

from components.render.etcd import CLIENT_PORT, METRICS_PORT, Member
from components.render.kubernetes import API_PORT
from components.render.templating import render

ADVERT_INTERVAL_SECONDS = 0.5


def haproxy_config(vip: str, api_servers: Sequence[Member], etcd_members: Sequence[Member],
                   etcd_spares: Sequence[Member] = ()) -> str:
    """Spares are backup servers of the etcd backend: one that took over a slot keeps the backend whole
    until the stack adopts it, and one whose etcd does not run is simply down."""
    return render("haproxy.cfg.j2", vip=vip, api_servers=api_servers, etcd_members=etcd_members,
                  etcd_spares=etcd_spares, api_port=API_PORT, etcd_client_port=CLIENT_PORT,
                  etcd_metrics_port=METRICS_PORT)


def vrrp_router_id(cluster_name: str) -> int:
    """A stable VRRP id per cluster (1..255), so two clusters on one segment do not clash."""
    return int(hashlib.sha256(cluster_name.encode()).hexdigest(), 16) % 255 + 1


def keepalived_config(cluster_name: str, vip: str, interface: str, me: Member,
                      load_balancers: Sequence[Member], prefix: int = 24) -> str:
    """Priorities differ per host (listed order) so exactly one holder wins an election."""
    index = [lb.name for lb in load_balancers].index(me.name)
    peers = [lb for lb in load_balancers if lb.name != me.name]
    ipaddress.ip_address(vip)
    return render("keepalived.conf.j2", me=me, peers=peers, vip=vip, prefix=prefix,
                  interface=interface, router_id=vrrp_router_id(cluster_name),
                  priority=150 - 10 * index, advert_interval=ADVERT_INTERVAL_SECONDS)
