"""AWS network and security groups of one cluster: private instances, NAT egress, least-open rules.

Both Network Load Balancers get a security group of their own. With client IP preservation a
target sees the client's address, not the load balancer's, so target groups cannot tell load
balancer traffic by source CIDR; referencing the load balancer's security group can, and the
clients are then checked once, at the load balancer (6443: admin CIDRs and cluster hosts;
2379: API servers and members). Everything else is closed: no rule opens 2379/2380 to a CIDR.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from components.config import Aws, ClusterConfig
from components.naming import resource_name
from components.render.etcd import CLIENT_PORT, METRICS_PORT, PEER_PORT
from components.render.kubernetes import API_PORT

SUBNET_BITS = 4  # a /16 VPC gives /20 subnets: private ones first, public ones from index 8


@dataclass(frozen=True)
class AwsNetwork:
    vpc_id: pulumi.Input[str]
    vpc_cidr: pulumi.Input[str]
    private_subnets: list[pulumi.Input[str]]  # one per zone, in the order of zones
    public_subnets: list[pulumi.Input[str]]  # empty with existing subnets
    nat_addresses: list[pulumi.Output[str]]  # where cluster hosts come from when they call the public API


@dataclass(frozen=True)
class SecurityGroups:
    api: aws.ec2.SecurityGroup
    etcd: aws.ec2.SecurityGroup
    api_lb: aws.ec2.SecurityGroup
    etcd_lb: aws.ec2.SecurityGroup


def _subnet(cidr: str, index: int) -> str:
    network = ipaddress.ip_network(cidr)
    return str(list(network.subnets(prefixlen_diff=SUBNET_BITS))[index])


def network(cfg: ClusterConfig, region: Aws, opts: pulumi.ResourceOptions) -> AwsNetwork:
    """A VPC with a private subnet per zone and per-zone NAT (a zone's loss keeps the others' egress),
    or the configured private subnets (which must already have egress)."""
    name = lambda *kind: resource_name(cfg.cluster_name, *kind)  # noqa: E731
    if region.subnet_ids:
        first = aws.ec2.get_subnet_output(id=region.subnet_ids[0])
        vpc_cidr = aws.ec2.get_vpc_output(id=first.vpc_id).cidr_block
        return AwsNetwork(first.vpc_id, vpc_cidr, list(region.subnet_ids), [], [])
    tags = lambda *kind: {"Name": name(*kind), "kcp-cluster": cfg.cluster_name}  # noqa: E731
    vpc = aws.ec2.Vpc(name("vpc"), cidr_block=region.vpc_cidr, enable_dns_support=True, enable_dns_hostnames=True,
                      tags=tags("vpc"), opts=opts)
    gateway = aws.ec2.InternetGateway(name("igw"), vpc_id=vpc.id, tags=tags("igw"), opts=opts)
    public_routes = aws.ec2.RouteTable(name("public-routes"), vpc_id=vpc.id, tags=tags("public"), routes=[
        aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)], opts=opts)
    private, public, nat_addresses = [], [], []
    for i, zone in enumerate(cfg.zones):
        pub = aws.ec2.Subnet(name("public", zone), vpc_id=vpc.id, availability_zone=zone,
                             cidr_block=_subnet(region.vpc_cidr, 8 + i), tags=tags("public", zone), opts=opts)
        aws.ec2.RouteTableAssociation(name("public", zone), subnet_id=pub.id, route_table_id=public_routes.id,
                                      opts=opts)
        address = aws.ec2.Eip(name("nat", zone), domain="vpc", tags=tags("nat", zone), opts=opts)
        nat = aws.ec2.NatGateway(name("nat", zone), subnet_id=pub.id, allocation_id=address.id,
                                 tags=tags("nat", zone), opts=opts)
        routes = aws.ec2.RouteTable(name("private-routes", zone), vpc_id=vpc.id, tags=tags("private", zone), routes=[
            aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)], opts=opts)
        priv = aws.ec2.Subnet(name("private", zone), vpc_id=vpc.id, availability_zone=zone,
                              cidr_block=_subnet(region.vpc_cidr, i), tags=tags("private", zone), opts=opts)
        aws.ec2.RouteTableAssociation(name("private", zone), subnet_id=priv.id, route_table_id=routes.id,
                                      opts=opts)
        private.append(priv.id)
        public.append(pub.id)
        nat_addresses.append(address.public_ip)
    return AwsNetwork(vpc.id, vpc.cidr_block, private, public, nat_addresses)


def security_groups(cfg: ClusterConfig, net: AwsNetwork, public_api: bool,
                    opts: pulumi.ResourceOptions) -> SecurityGroups:
    cluster = cfg.cluster_name

    def group(kind: str, why: str) -> aws.ec2.SecurityGroup:
        return aws.ec2.SecurityGroup(resource_name(cluster, kind, "sg"), name=resource_name(cluster, kind),
                                     description=why, vpc_id=net.vpc_id,
                                     tags={"Name": resource_name(cluster, kind), "kcp-cluster": cluster}, opts=opts)

    sg = SecurityGroups(
        api=group("apiserver", "kube-apiserver instances"), etcd=group("etcd", "etcd members"),
        api_lb=group("api-lb", "Kubernetes API load balancer"), etcd_lb=group("etcd-lb", "etcd client load balancer"))

    def allow(kind: str, target: aws.ec2.SecurityGroup, port: int, *, cidr: pulumi.Input[str] | None = None,
              source: aws.ec2.SecurityGroup | None = None, why: str) -> None:
        aws.vpc.SecurityGroupIngressRule(
            resource_name(cluster, "in", kind), security_group_id=target.id, ip_protocol="tcp", from_port=port,
            to_port=port, cidr_ipv4=cidr, referenced_security_group_id=source.id if source else None,
            description=why, opts=opts)

    for i, cidr in enumerate(sorted(set(cfg.network.admin_cidrs))):
        allow(f"api-lb-admin-{i}", sg.api_lb, API_PORT, cidr=cidr, why="admins")
    # Cluster hosts reach an internet-facing API through their NAT addresses, an internal one directly.
    hosts = [a.apply(lambda ip: f"{ip}/32") for a in net.nat_addresses] if public_api else [net.vpc_cidr]
    for i, cidr in enumerate(hosts):
        allow(f"api-lb-hosts-{i}", sg.api_lb, API_PORT, cidr=cidr, why="cluster hosts")
    allow("api-from-lb", sg.api, API_PORT, source=sg.api_lb, why="API load balancer: traffic and /readyz checks")
    allow("etcd-lb-from-api", sg.etcd_lb, CLIENT_PORT, source=sg.api, why="API servers")
    allow("etcd-lb-from-etcd", sg.etcd_lb, CLIENT_PORT, source=sg.etcd, why="etcd members")
    allow("etcd-client-from-api", sg.etcd, CLIENT_PORT, source=sg.api, why="API servers")
    # Members call each other's client port: self-healing (member add/remove, quorum checks) and
    # the backup job's leader check use the members' client URLs.
    allow("etcd-client-from-etcd", sg.etcd, CLIENT_PORT, source=sg.etcd, why="etcd members: self-healing, backups")
    allow("etcd-client-from-lb", sg.etcd, CLIENT_PORT, source=sg.etcd_lb, why="etcd load balancer")
    allow("etcd-peer", sg.etcd, PEER_PORT, source=sg.etcd, why="etcd peers")
    allow("etcd-health-from-lb", sg.etcd, METRICS_PORT, source=sg.etcd_lb, why="etcd load balancer /health checks")
    _egress(cluster, sg, opts)
    return sg


def _egress(cluster: str, sg: SecurityGroups, opts: pulumi.ResourceOptions) -> None:
    """Instances reach AWS APIs, the releases and the bucket; load balancers only their targets."""
    for kind, group in (("apiserver", sg.api), ("etcd", sg.etcd)):
        aws.vpc.SecurityGroupEgressRule(resource_name(cluster, "out", kind), security_group_id=group.id,
                                        ip_protocol="-1", cidr_ipv4="0.0.0.0/0", description="egress", opts=opts)
    for kind, group, target, ports in (("api-lb", sg.api_lb, sg.api, (API_PORT,)),
                                       ("etcd-lb", sg.etcd_lb, sg.etcd, (CLIENT_PORT, METRICS_PORT))):
        for port in ports:
            aws.vpc.SecurityGroupEgressRule(
                resource_name(cluster, "out", kind, str(port)), security_group_id=group.id, ip_protocol="tcp",
                from_port=port, to_port=port, referenced_security_group_id=target.id, description="to targets",
                opts=opts)
