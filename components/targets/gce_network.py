"""GCE network and firewall of one cluster: private VMs, Cloud NAT egress, least-open rules.

Firewall rules select machines by network tag (`<cluster>-etcd`, `<cluster>-apiserver`): all
control-plane VMs share one service account (the one that reads their bundles), so tags are
what tells an API server from an etcd member. GCE denies all other ingress implicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from components.config import ClusterConfig, Gce
from components.naming import resource_name
from components.render.etcd import CLIENT_PORT, METRICS_PORT, PEER_PORT
from components.render.kubernetes import API_PORT
from components.targets.cloud import role_tag

# Google's health-check probe ranges, from "Health checks overview: probe IP ranges and firewall
# rules" (https://cloud.google.com/load-balancing/docs/health-check-concepts#ip-ranges) and
# "Firewall rules" (https://cloud.google.com/load-balancing/docs/firewall-rules):
# MIG autohealing and internal passthrough Network Load Balancers probe from these two ...
AUTOHEALING_AND_INTERNAL_LB_PROBES = ("35.191.0.0/16", "130.211.0.0/22")
# ... backend-service-based external passthrough Network Load Balancers from these three.
EXTERNAL_PASSTHROUGH_LB_PROBES = ("35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22")
NAT_ADDRESSES = 2  # two static egress addresses: the NAT keeps working if one is drained


@dataclass(frozen=True)
class GceNetwork:
    network: pulumi.Input[str]
    subnetwork: pulumi.Input[str]
    nat_addresses: list[pulumi.Output[str]]  # where cluster hosts come from when they call the API's public address


def network(cfg: ClusterConfig, gce: Gce, opts: pulumi.ResourceOptions) -> GceNetwork:
    """A VPC and subnet (or the configured ones) with Cloud NAT on static addresses."""
    name = lambda *kind: resource_name(cfg.cluster_name, *kind)  # noqa: E731
    if gce.network and gce.subnetwork:
        net: pulumi.Input[str] = f"projects/{gce.project}/global/networks/{gce.network}"
        subnet: pulumi.Input[str] = f"projects/{gce.project}/regions/{gce.region}/subnetworks/{gce.subnetwork}"
    else:
        vpc = gcp.compute.Network(name("network"), name=name("network"), project=gce.project,
                                  auto_create_subnetworks=False, routing_mode="REGIONAL", opts=opts)
        # Private Google Access: VMs without external addresses reach Secret Manager and GCS directly.
        subnetwork = gcp.compute.Subnetwork(
            name("subnet"), name=name("subnet"), project=gce.project, region=gce.region, network=vpc.id,
            ip_cidr_range=gce.subnet_cidr, private_ip_google_access=True, opts=opts)
        net, subnet = vpc.id, subnetwork.id
    router = gcp.compute.Router(name("router"), name=name("router"), project=gce.project, region=gce.region,
                                network=net, opts=opts)
    addresses = [gcp.compute.Address(name("nat", str(i)), name=name("nat", str(i)), project=gce.project,
                                     region=gce.region, address_type="EXTERNAL", opts=opts)
                 for i in range(NAT_ADDRESSES)]
    gcp.compute.RouterNat(
        name("nat"), name=name("nat"), project=gce.project, region=gce.region, router=router.name,
        nat_ip_allocate_option="MANUAL_ONLY", nat_ips=[a.self_link for a in addresses],
        source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS",
        subnetworks=[gcp.compute.RouterNatSubnetworkArgs(name=subnet, source_ip_ranges_to_nats=["ALL_IP_RANGES"])],
        log_config=gcp.compute.RouterNatLogConfigArgs(enable=True, filter="ERRORS_ONLY"), opts=opts)
    return GceNetwork(net, subnet, [a.address for a in addresses])


def firewall_rules(cfg: ClusterConfig, net: GceNetwork, opts: pulumi.ResourceOptions) -> list[gcp.compute.Firewall]:
    """The only ingress the control plane gets; each rule names its sources exactly."""
    cluster = cfg.cluster_name
    api, etcd = role_tag(cluster, "apiserver"), role_tag(cluster, "etcd")

    def rule(kind: str, port: int, target: str, ranges: list[pulumi.Input[str]], tags: list[str],
             why: str) -> gcp.compute.Firewall:
        return gcp.compute.Firewall(
            resource_name(cluster, "allow", kind), name=resource_name(cluster, "allow", kind),
            project=cfg.gce.project if cfg.gce else None, network=net.network, direction="INGRESS",
            description=why, allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(port)])],
            source_ranges=ranges or None, source_tags=tags or None, target_tags=[target], opts=opts)

    probes = sorted(set(EXTERNAL_PASSTHROUGH_LB_PROBES) | set(AUTOHEALING_AND_INTERNAL_LB_PROBES))
    admins = sorted(set(cfg.network.admin_cidrs))
    return [
        rule("api", API_PORT, api, [*admins, *probes, *net.nat_addresses], [api, etcd],
             "kube-apiserver: admins, load balancer and autohealing probes, cluster hosts "
             "(directly, or through Cloud NAT to the public load balancer)"),
        # etcd members call each other's client port too: self-healing (member list/add/remove,
        # quorum checks) and the leader check of backups use the members' client URLs.
        rule("etcd-client", CLIENT_PORT, etcd, [], [api, etcd],
             "etcd clients: API servers, and etcd members themselves for self-healing and backups"),
        rule("etcd-peer", PEER_PORT, etcd, [], [etcd], "etcd peers: members only"),
        rule("etcd-health", METRICS_PORT, etcd, list(AUTOHEALING_AND_INTERNAL_LB_PROBES), [],
             "etcd /health for autohealing and the internal load balancer's probes only"),
    ]
