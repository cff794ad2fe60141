"""AWS: Auto Scaling control plane behind Network Load Balancers, per-member volumes and interfaces.

Only what is specific to AWS lives here; slots, bundles, retention and the boot path come from
components/targets/cloud.py and kcp_host/cloudboot.py. Shape, method for method the same as
components/targets/gce.py: endpoints, network, firewall, identities, backup bucket, secrets, health checks,
etcd member groups, API server group, load balancers.

- Every etcd member is an Auto Scaling group of one in its zone. Its network interface (the
  fixed private address the certificates name) is created here and attached at boot, in both
  disk modes; with disk: persistent its EBS volume too, so a replacement is the same member
  on the same data. With instance storage the replacement starts empty and rejoins by runtime
  reconfiguration (etcd-member-recovery).
- API servers are one Auto Scaling group across the zones; both groups are replaced on their
  load balancer's health check (health_check_type ELB) after a boot-sized grace period.
- Targets are instances, so the NLBs send to the primary address; members forward 2379/2381
  from it to the member address (cloud-boot), as on GCE's passthrough load balancers.
"""

from __future__ import annotations

import base64
import gzip

import pulumi
import pulumi_aws as aws

from components.config import ClusterConfig
from components.naming import short_name
from components.pki import Endpoints
from components.render.etcd import CLIENT_PORT, METRICS_PORT
from components.render.kubernetes import API_PORT
from components.targets import SharedAssets, cloud
from components.targets.aws_access import (
    attach_policy,
    backup_bucket,
    cluster_key,
    instance_role,
    secrets_read_policy,
)
from components.targets.aws_network import AwsNetwork, network, security_groups
from components.topology import Machine, Topology

PROVIDER = "aws"
USER_DATA_MAX_BYTES = 16_384  # EC2's limit on user data before base64; gzip'd, which cloud-init unpacks
API_HEALTH_PATH, ETCD_HEALTH_PATH = "/readyz", "/health"
# Canonical's Ubuntu LTS: ships snapd, from which the boot path takes the current AWS CLI v2.
UBUNTU_OWNER, UBUNTU_IMAGES = "099720109477", "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"


class AwsTarget(cloud.CloudTarget):
    """Declares one cluster's instances, load balancers, security groups, secrets and backups on AWS."""

    def __init__(self, name: str, cfg: ClusterConfig, topology: Topology, parent: pulumi.Resource) -> None:
        super().__init__(name, cfg, topology, parent)
        assert cfg.aws is not None
        self._aws = cfg.aws

    # -- what certificates name ------------------------------------------------------
    def endpoints(self) -> Endpoints:
        """Create the members' interfaces and both NLBs: certificates name their addresses and DNS names."""
        self._network()
        self._firewall()
        self._interfaces = {
            m.name: aws.ec2.NetworkInterface(
                f"{m.name}-interface", subnet_id=_zone_subnet(self._cfg, self._net, m.zone),
                security_groups=[self._sg.etcd.id], description=f"etcd member {m.name}: its fixed address",
                tags=_tags(self._cfg.cluster_name, m.name), opts=self._opts)
            for m in self._topology.etcd_members}
        subnets = self._net.public_subnets if self._aws.public_api else self._net.private_subnets
        self._api_nlb = aws.lb.LoadBalancer(
            self._child("api-nlb"), name=short_name(self._cfg.cluster_name, "api"), load_balancer_type="network",
            internal=not self._aws.public_api, subnets=subnets, security_groups=[self._sg.api_lb.id],
            enable_cross_zone_load_balancing=True, tags=_tags(self._cfg.cluster_name), opts=self._opts)
        self._etcd_nlb = aws.lb.LoadBalancer(
            self._child("etcd-nlb"), name=short_name(self._cfg.cluster_name, "etcd"), load_balancer_type="network",
            internal=True, subnets=self._net.private_subnets, security_groups=[self._sg.etcd_lb.id],
            enable_cross_zone_load_balancing=True, tags=_tags(self._cfg.cluster_name), opts=self._opts)
        self._endpoints = Endpoints(
            api_host=self._api_nlb.dns_name, etcd_lb_host=self._etcd_nlb.dns_name,
            member_addresses={n: i.private_ip for n, i in self._interfaces.items()}, hosts_are_ips=False)
        return self._endpoints

    # -- network and firewall --------------------------------------------------------
    def _network(self) -> None:
        """A VPC with a private subnet per zone and NAT (or the configured subnets); no public addresses."""
        self._net = network(self._cfg, self._aws, self._opts)

    def _firewall(self) -> None:
        self._sg = security_groups(self._cfg, self._net, self._aws.public_api, self._opts)

    # -- identities, secrets and backups ---------------------------------------------
    def _identities(self) -> None:
        """An instance role per role (cloud.IDENTITIES), all under the cluster's one KMS key; each launch template
        runs as its role's."""
        self._key = cluster_key(self._cfg, self._opts)
        self._instance_roles = {identity: instance_role(self._cfg, identity,
                                                        cloud.inherits_shared_identity(identity, self._slots),
                                                        self._key, self._opts)
                                for identity in cloud.identity_secrets(self._cfg.cluster_name, self._slots)}

    def _backup_bucket(self) -> None:
        """Private, SSE-KMS S3 bucket under Object Lock, expiry by age; only the etcd role may add snapshots."""
        writer = self._instance_roles[cloud.etcd_identity(self._slots)]
        self._bucket = backup_bucket(self._cfg, writer, self._aws.region, self._opts)
        self._backup_url = self._bucket.bucket.apply(lambda b: f"s3://{b}/{cloud.backup_prefix(self._cfg.cluster_name)}")
        self._marker_url = self._bucket.bucket.apply(lambda b: f"s3://{b}/{cloud.marker_key(self._cfg.cluster_name)}")

    def _secrets(self, assets: SharedAssets) -> None:
        """One Secrets Manager secret per bundle under the cluster's KMS key, readable only by the roles whose
        instances fetch it."""
        cluster = cloud.resolved_cluster(self._cfg, self._topology, self._endpoints, self._backup_url)
        arns: dict[str, pulumi.Output[str]] = {}
        for secret_name, payload in cloud.secret_payloads(self._cfg, self._topology, cluster,
                                                          assets.credentials).items():
            secret = aws.secretsmanager.Secret(
                f"{secret_name}-secret", name=secret_name, kms_key_id=self._key.arn,
                recovery_window_in_days=7, tags=_tags(self._cfg.cluster_name), opts=self._opts)
            aws.secretsmanager.SecretVersion(f"{secret_name}-secret-version", secret_id=secret.id,
                                             secret_string=payload, opts=self._opts)
            arns[secret_name] = secret.arn
        for identity, secrets in cloud.identity_secrets(self._cfg.cluster_name, self._slots).items():
            secrets_read_policy(self._cfg, self._instance_roles[identity], self._aws.region,
                                [arns[s] for s in secrets], self._opts)

    # -- machines --------------------------------------------------------------------
    def _health_checks(self) -> None:
        """Target groups carry the checks that both the NLBs and the Auto Scaling groups act on."""
        common = {"vpc_id": self._net.vpc_id, "protocol": "TCP", "target_type": "instance",
                  "deregistration_delay": 30, "tags": _tags(self._cfg.cluster_name), "opts": self._opts}
        self._api_targets = aws.lb.TargetGroup(
            self._child("api-tg"), name=short_name(self._cfg.cluster_name, "api"), port=API_PORT,
            # Internal NLB: without preservation a server can reach the API through the NLB even when
            # the NLB picks that same server (a preserved source address would hairpin and fail).
            preserve_client_ip="true" if self._aws.public_api else "false",
            health_check=aws.lb.TargetGroupHealthCheckArgs(
                protocol="HTTPS", port=str(API_PORT), path=API_HEALTH_PATH, matcher="200",
                interval=10, healthy_threshold=2, unhealthy_threshold=3), **common)
        self._etcd_targets = aws.lb.TargetGroup(
            self._child("etcd-tg"), name=short_name(self._cfg.cluster_name, "etcd"), port=CLIENT_PORT,
            # The design: a client stays on one member, so it is not bounced between members' views.
            stickiness=aws.lb.TargetGroupStickinessArgs(type="source_ip", enabled=True),
            health_check=aws.lb.TargetGroupHealthCheckArgs(
                protocol="HTTP", port=str(METRICS_PORT), path=ETCD_HEALTH_PATH, matcher="200",
                interval=10, healthy_threshold=2, unhealthy_threshold=3), **common)

    def _machine_template(self, slot: cloud.Slot, instance_type: str) -> aws.ec2.LaunchTemplate:
        """Current Ubuntu LTS, IMDSv2 only (tags readable: the slot), encrypted root, the shared boot path."""
        role = "etcd" if slot.has("etcd") else "api"
        settings = cloud.boot_settings(self._cfg, slot, self._marker_url, cloud.ETCD_LB_PORTS if slot.has("etcd")
                                       else ())
        settings |= {"aws_region": self._aws.region, "vpc_cidr": self._net.vpc_cidr}
        user_data = cloud.startup_script(PROVIDER, settings).apply(_user_data)
        groups = [self._sg.etcd.id] if slot.has("etcd") else []
        groups += [self._sg.api.id] if slot.has("apiserver") else []
        image = aws.ec2.get_ami_output(most_recent=True, owners=[UBUNTU_OWNER], filters=[
            aws.ec2.GetAmiFilterArgs(name="name", values=[UBUNTU_IMAGES]),
            aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"])])
        return aws.ec2.LaunchTemplate(
            self._child(role, "template"), name_prefix=f"{self._child(role)}-", image_id=image.id,
            instance_type=instance_type, vpc_security_group_ids=groups, update_default_version=True,
            user_data=user_data,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(
                arn=self._instance_roles[slot.identity].profile.arn),
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1,
                instance_metadata_tags="enabled"),
            block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name="/dev/sda1", ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=30, volume_type="gp3", encrypted="true", delete_on_termination="true"))],
            tag_specifications=[aws.ec2.LaunchTemplateTagSpecificationArgs(
                resource_type=kind, tags=_tags(self._cfg.cluster_name) | {"kcp-role": role})
                for kind in ("instance", "volume")],
            tags=_tags(self._cfg.cluster_name), opts=self._opts)

    def _etcd_member_groups(self) -> list[aws.autoscaling.Group]:
        """Per member an Auto Scaling group of one in its zone, replaced on etcd's /health."""
        persistent = self._cfg.etcd.disk == "persistent"
        slot = next(s for s in self._slots if s.has("etcd"))
        template = self._machine_template(slot, self._cfg.etcd.machine_type or _etcd_instance(persistent))
        volumes = {m.name: self._data_disk(m) for m in self._topology.etcd_members} if persistent else {}
        partition, caller = aws.get_partition_output(), aws.get_caller_identity_output()
        instances = pulumi.Output.all(partition.partition, caller.account_id).apply(
            lambda v: f"arn:{v[0]}:ec2:{self._aws.region}:{v[1]}:instance/*")
        attach_policy(self._cfg, self._instance_roles[slot.identity], instances, [v.arn for v in volumes.values()],
                      [i.arn for i in self._interfaces.values()], self._opts)
        return [self._etcd_member_group(m, template, slot) for m in self._topology.etcd_members]

    def _etcd_member_group(self, member: Machine, template: aws.ec2.LaunchTemplate,
                           slot: cloud.Slot) -> aws.autoscaling.Group:
        targets = [self._etcd_targets.arn, *([self._api_targets.arn] if slot.has("apiserver") else [])]
        return aws.autoscaling.Group(
            f"{member.name}-group", name=member.name,
            vpc_zone_identifiers=[_zone_subnet(self._cfg, self._net, member.zone)],
            # Never two instances of one member: its volume and interface attach to one instance.
            min_size=1, max_size=1, desired_capacity=1,
            instance_maintenance_policy=aws.autoscaling.GroupInstanceMaintenancePolicyArgs(
                min_healthy_percentage=0, max_healthy_percentage=100),
            # No instance refresh: the latest template reaches a member only when it is replaced, so members never
            # roll together; bundle changes reach running members through `kcp-host cloud-refresh`, one at a time.
            launch_template=aws.autoscaling.GroupLaunchTemplateArgs(id=template.id, version=template.latest_version
                                                                    .apply(str)),
            health_check_type="ELB", health_check_grace_period=cloud.ETCD_BOOT_SECONDS, target_group_arns=targets,
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True)
                  for k, v in _tags(self._cfg.cluster_name, member.name).items()],
            wait_for_capacity_timeout="0", opts=self._opts)

    def _data_disk(self, member: Machine) -> aws.ebs.Volume:
        """The member's data outlives its instance: created here, attached by every replacement."""
        return aws.ebs.Volume(
            f"{member.name}-data", availability_zone=member.zone, size=self._cfg.etcd.disk_size_gb, type="gp3",
            encrypted=True, tags=_tags(self._cfg.cluster_name, member.name), opts=self._opts)

    def _api_server_group(self) -> aws.autoscaling.Group | None:
        """One group across every zone (balanced by AZ), replaced on the NLB's HTTPS /readyz check."""
        slot = next((s for s in self._slots if s.machine is None), None)
        if slot is None:
            return None  # colocated: the member groups carry the API servers
        template = self._machine_template(slot, self._cfg.api_servers.machine_type or "m6i.large")
        count = self._cfg.api_servers.count
        return aws.autoscaling.Group(
            self._child("api-group"), name=self._child("api"), vpc_zone_identifiers=self._net.private_subnets,
            min_size=count, max_size=count, desired_capacity=count,
            launch_template=aws.autoscaling.GroupLaunchTemplateArgs(id=template.id,
                                                                    version=template.latest_version.apply(str)),
            health_check_type="ELB", health_check_grace_period=cloud.API_BOOT_SECONDS,
            target_group_arns=[self._api_targets.arn],
            instance_refresh=aws.autoscaling.GroupInstanceRefreshArgs(
                strategy="Rolling", preferences=aws.autoscaling.GroupInstanceRefreshPreferencesArgs(
                    min_healthy_percentage=100, max_healthy_percentage=200,
                    instance_warmup=str(cloud.API_BOOT_SECONDS))),
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True)
                  for k, v in _tags(self._cfg.cluster_name, slot.name).items()],
            wait_for_capacity_timeout="0", opts=self._opts)

    # -- load balancers --------------------------------------------------------------
    def _load_balancers(self, members: list[aws.autoscaling.Group], api: aws.autoscaling.Group | None) -> None:
        """TCP listeners: the API on 6443, etcd clients on 2379 (source-IP stickiness in its target group)."""
        del members, api  # the groups register themselves in the target groups
        for kind, nlb, port, targets in (("api", self._api_nlb, API_PORT, self._api_targets),
                                         ("etcd", self._etcd_nlb, CLIENT_PORT, self._etcd_targets)):
            aws.lb.Listener(self._child(kind, "listener"), load_balancer_arn=nlb.arn, port=port, protocol="TCP",
                            default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward",
                                                                              target_group_arn=targets.arn)],
                            tags=_tags(self._cfg.cluster_name), opts=self._opts)


def _user_data(script: str) -> str:
    packed = gzip.compress(script.encode(), mtime=0)
    if len(packed) > USER_DATA_MAX_BYTES:
        raise ValueError(f"user data is {len(packed)} bytes gzip'd, over EC2's limit of {USER_DATA_MAX_BYTES}")
    return base64.b64encode(packed).decode()


def _zone_subnet(cfg: ClusterConfig, net: AwsNetwork, zone: str) -> pulumi.Input[str]:
    return net.private_subnets[cfg.zones.index(zone)]


def _etcd_instance(persistent: bool) -> str:
    return "m6i.large" if persistent else "i4i.large"  # i4i: local NVMe instance storage


def _tags(cluster: str, slot: str | None = None) -> dict[str, str]:
    """kcp-cluster scopes the attach permissions; kcp-slot tells a booting instance who it is."""
    return {"kcp-cluster": cluster, **({"kcp-slot": slot, "Name": slot} if slot else {})}
