"""Google Compute Engine: regional, autohealing control plane behind Google's passthrough load balancers.

Only what is specific to GCE lives here; slots, bundles, retention and the boot path come from
components/targets/cloud.py and kcp_host/cloudboot.py. Shape, method for method the same as
components/targets/aws.py: endpoints, network, firewall, identities, backup bucket, secrets, health checks,
etcd member groups, API server group, load balancers.

- Every etcd member is a zonal managed instance group of one with a per-instance config that
  pins its name, its reserved internal address and (disk: persistent) its data disk, so an
  autohealed replacement is the same member on the same data. With local SSD the replacement
  starts empty and rejoins by runtime reconfiguration (etcd-member-recovery).
- API servers are one regional group spread evenly over the zones.
- Both passthrough load balancers deliver packets addressed to the load balancer; the boot
  path forwards those ports to the address etcd / kube-apiserver listen on.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.config import ClusterConfig
from components.pki import Endpoints
from components.render.etcd import CLIENT_PORT, METRICS_PORT
from components.render.kubernetes import API_PORT
from components.targets import SharedAssets, cloud
from components.targets.gce_access import backup_bucket_access, service_account
from components.targets.gce_network import firewall_rules, network
from components.topology import Machine, Topology

PROVIDER = "gce"
API_HEALTH_PATH, ETCD_HEALTH_PATH = "/readyz", "/health"


class GceTarget(cloud.CloudTarget):
    """Declares one cluster's machines, load balancers, firewall, secrets and backups on GCE."""

    def __init__(self, name: str, cfg: ClusterConfig, topology: Topology, parent: pulumi.Resource) -> None:
        super().__init__(name, cfg, topology, parent)
        assert cfg.gce is not None
        self._gce = cfg.gce

    # -- what certificates name ------------------------------------------------------
    def endpoints(self) -> Endpoints:
        """Reserve every address a certificate names before the PKI is issued."""
        self._network()
        self._firewall()
        self._member_addresses = {
            m.name: gcp.compute.Address(
                f"{m.name}-address", name=f"{m.name}-address", address_type="INTERNAL", purpose="GCE_ENDPOINT",
                region=self._gce.region, subnetwork=self._net.subnetwork, opts=self._opts)
            for m in self._topology.etcd_members}
        self._etcd_lb_address = gcp.compute.Address(
            self._child("etcd-lb"), name=self._child("etcd-lb"), address_type="INTERNAL",
            purpose="GCE_ENDPOINT", region=self._gce.region, subnetwork=self._net.subnetwork, opts=self._opts)
        self._api_lb_address = gcp.compute.Address(
            self._child("api-lb"), name=self._child("api-lb"), address_type="EXTERNAL",
            region=self._gce.region, opts=self._opts)
        self._endpoints = Endpoints(
            api_host=self._api_lb_address.address, etcd_lb_host=self._etcd_lb_address.address,
            member_addresses={n: a.address for n, a in self._member_addresses.items()})
        return self._endpoints

    # -- network and firewall --------------------------------------------------------
    def _network(self) -> None:
        """VPC, subnet and Cloud NAT (or the configured network); VMs get no external address."""
        self._net = network(self._cfg, self._gce, self._opts)

    def _firewall(self) -> None:
        firewall_rules(self._cfg, self._net, self._opts)

    # -- identities, secrets and backups ---------------------------------------------
    def _identities(self) -> None:
        """A service account per role (cloud.IDENTITIES); each VM template runs as its role's."""
        self._accounts = {identity: service_account(self._cfg, self._gce, identity,
                                                    cloud.inherits_shared_identity(identity, self._slots), self._opts)
                          for identity in cloud.identity_secrets(self._cfg.cluster_name, self._slots)}

    def _backup_bucket(self) -> None:
        """GCS bucket under a retention policy, expiry by age; only the etcd hosts' account may add snapshots."""
        writer = self._accounts[cloud.etcd_identity(self._slots)]
        self._bucket = backup_bucket_access(self._cfg, self._gce, writer.member, self._opts)
        self._backup_url = self._bucket.name.apply(lambda b: f"gs://{b}/{cloud.backup_prefix(self._cfg.cluster_name)}")
        self._marker_url = self._bucket.name.apply(lambda b: f"gs://{b}/{cloud.marker_key(self._cfg.cluster_name)}")

    def _secrets(self, assets: SharedAssets) -> None:
        """One Secret Manager secret per bundle, readable only by the accounts whose machines fetch it."""
        cluster = cloud.resolved_cluster(self._cfg, self._topology, self._endpoints, self._backup_url)
        readers = cloud.identity_secrets(self._cfg.cluster_name, self._slots)
        for secret_id, payload in cloud.secret_payloads(self._cfg, self._topology, cluster, assets.credentials).items():
            secret = gcp.secretmanager.Secret(
                f"{secret_id}-secret", secret_id=secret_id, project=self._gce.project,
                replication=gcp.secretmanager.SecretReplicationArgs(
                    auto=gcp.secretmanager.SecretReplicationAutoArgs()),
                labels={"kcp-cluster": self._cfg.cluster_name}, opts=self._opts)
            gcp.secretmanager.SecretVersion(f"{secret_id}-secret-version", secret=secret.id,
                                            secret_data=payload, opts=self._opts)
            for identity in (i for i, secrets in readers.items() if secret_id in secrets):
                inherited = cloud.inherits_shared_identity(identity, self._slots)
                gcp.secretmanager.SecretIamMember(
                    f"{secret_id}-secret-accessor-{identity}", project=self._gce.project, secret_id=secret.secret_id,
                    role="roles/secretmanager.secretAccessor", member=self._accounts[identity].member,
                    opts=self._opts.merge(cloud.formerly(inherited, f"{secret_id}-secret-accessor")))

    # -- machines --------------------------------------------------------------------
    def _health_checks(self) -> None:
        """Regional checks, shared by autohealing and the load balancers: one notion of healthy."""
        common = {"region": self._gce.region, "check_interval_sec": 10, "timeout_sec": 5,
                  "healthy_threshold": 2, "unhealthy_threshold": 3, "opts": self._opts}
        self._api_check = gcp.compute.RegionHealthCheck(
            self._child("api-readyz"), name=self._child("api-readyz"),
            https_health_check=gcp.compute.RegionHealthCheckHttpsHealthCheckArgs(
                port=API_PORT, request_path=API_HEALTH_PATH), **common)
        self._etcd_check = gcp.compute.RegionHealthCheck(
            self._child("etcd-health"), name=self._child("etcd-health"),
            http_health_check=gcp.compute.RegionHealthCheckHttpHealthCheckArgs(
                port=METRICS_PORT, request_path=ETCD_HEALTH_PATH), **common)

    def _machine_template(self, slot: cloud.Slot, machine_type: str,
                          extra_disks: list[gcp.compute.InstanceTemplateDiskArgs]) -> gcp.compute.InstanceTemplate:
        """Shielded VM, no external address, its role's service account, the shared boot path."""
        role = "etcd" if slot.has("etcd") else "api"
        settings = cloud.boot_settings(self._cfg, slot, self._marker_url, cloud.lb_ports(slot))
        lbs = [self._etcd_lb_address.address] if slot.has("etcd") else []
        lbs += [self._api_lb_address.address] if slot.has("apiserver") else []
        settings |= {"gce_project": self._gce.project, "lb_addresses": pulumi.Output.all(*lbs)}
        image = _image(self._gce.image)
        metadata: dict[str, pulumi.Input[str]] = {
            "startup-script": cloud.startup_script(PROVIDER, settings),
            "block-project-ssh-keys": "true", "enable-oslogin": "TRUE"}
        if slot.machine is None:
            metadata["kcp-slot"] = slot.name  # etcd members get theirs from their per-instance config
        return gcp.compute.InstanceTemplate(
            self._child(role, "template"), name_prefix=f"{self._child(role)}-", region=self._gce.region,
            machine_type=machine_type, metadata=metadata,
            tags=[cloud.role_tag(self._cfg.cluster_name, r) for r in slot.roles],
            labels={"kcp-cluster": self._cfg.cluster_name, "kcp-role": role},
            disks=[gcp.compute.InstanceTemplateDiskArgs(boot=True, auto_delete=True, source_image=image,
                                                        disk_size_gb=30, disk_type="pd-balanced"),
                   *extra_disks],
            network_interfaces=[gcp.compute.InstanceTemplateNetworkInterfaceArgs(subnetwork=self._net.subnetwork)],
            service_account=gcp.compute.InstanceTemplateServiceAccountArgs(
                email=self._accounts[slot.identity].email, scopes=["https://www.googleapis.com/auth/cloud-platform"]),
            shielded_instance_config=gcp.compute.InstanceTemplateShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True),
            opts=self._opts)

    def _etcd_member_groups(self) -> list[gcp.compute.InstanceGroupManager]:
        """Per member a zonal group of one: autohealed on etcd's /health, identity pinned per instance."""
        persistent = self._cfg.etcd.disk == "persistent"
        local_ssd = [] if persistent else [gcp.compute.InstanceTemplateDiskArgs(
            type="SCRATCH", disk_type="local-ssd", interface="NVME", disk_size_gb=375)]
        slot = next(s for s in self._slots if s.has("etcd"))
        template = self._machine_template(slot, self._cfg.etcd.machine_type or _etcd_machine(persistent), local_ssd)
        return [self._etcd_member_group(m, template, persistent) for m in self._topology.etcd_members]

    def _etcd_member_group(self, member: Machine, template: gcp.compute.InstanceTemplate,
                           persistent: bool) -> gcp.compute.InstanceGroupManager:
        group = gcp.compute.InstanceGroupManager(
            f"{member.name}-group", name=member.name, zone=member.zone, base_instance_name=member.name,
            # No target_size: the per-instance config below creates the one VM under its fixed name
            # (a target size as well would add a second, randomly named one: terraform-provider-google#15911).
            versions=[gcp.compute.InstanceGroupManagerVersionArgs(instance_template=template.self_link_unique)],
            auto_healing_policies=gcp.compute.InstanceGroupManagerAutoHealingPoliciesArgs(
                health_check=self._etcd_check.id, initial_delay_sec=cloud.ETCD_BOOT_SECONDS),
            stateful_internal_ips=[gcp.compute.InstanceGroupManagerStatefulInternalIpArgs(
                interface_name="nic0", delete_rule="NEVER")],
            stateful_disks=[gcp.compute.InstanceGroupManagerStatefulDiskArgs(
                device_name=cloud.ETCD_DATA_DEVICE, delete_rule="NEVER")] if persistent else None,
            # Never roll members on a template change: nothing orders the groups' rolls, so two could leave
            # quorum at once. Bundle changes (configuration, certificates, versions) reach running members through
            # `kcp-host cloud-refresh`, one at a time; a new template only when a member is replaced.
            update_policy=gcp.compute.InstanceGroupManagerUpdatePolicyArgs(
                type="OPPORTUNISTIC", minimal_action="REPLACE", replacement_method="RECREATE",
                max_surge_fixed=0, max_unavailable_fixed=1),
            wait_for_instances=False, opts=self._opts)
        disks = [gcp.compute.PerInstanceConfigPreservedStateDiskArgs(
            device_name=cloud.ETCD_DATA_DEVICE, source=self._data_disk(member).id, mode="READ_WRITE",
            delete_rule="NEVER")] if persistent else None
        gcp.compute.PerInstanceConfig(
            f"{member.name}-instance-config", zone=member.zone, instance_group_manager=group.name,
            name=member.name, minimal_action="REPLACE", most_disruptive_allowed_action="REPLACE",
            remove_instance_state_on_destroy=False,
            preserved_state=gcp.compute.PerInstanceConfigPreservedStateArgs(
                metadata={"kcp-slot": member.name}, disks=disks,
                internal_ips=[gcp.compute.PerInstanceConfigPreservedStateInternalIpArgs(
                    interface_name="nic0", auto_delete="NEVER",
                    ip_address=gcp.compute.PerInstanceConfigPreservedStateInternalIpIpAddressArgs(
                        address=self._member_addresses[member.name].self_link))]),
            opts=self._opts)
        return group

    def _data_disk(self, member: Machine) -> gcp.compute.Disk:
        """The member's data outlives its VM: created here, re-attached to every replacement."""
        return gcp.compute.Disk(
            f"{member.name}-data", name=f"{member.name}-data", zone=member.zone, type="pd-ssd",
            size=self._cfg.etcd.disk_size_gb, labels={"kcp-cluster": self._cfg.cluster_name, "kcp-slot": member.name},
            opts=self._opts)

    def _api_server_group(self) -> gcp.compute.RegionInstanceGroupManager | None:
        """One regional group spread evenly over the zones, autohealed on /readyz over HTTPS."""
        slot = next((s for s in self._slots if s.machine is None), None)
        if slot is None:
            return None  # colocated: the member groups carry the API servers
        template = self._machine_template(slot, self._cfg.api_servers.machine_type or "e2-standard-4", [])
        zones = len(self._cfg.zones)
        return gcp.compute.RegionInstanceGroupManager(
            self._child("api-group"), name=self._child("api"), region=self._gce.region,
            base_instance_name=self._child("api"), target_size=self._cfg.api_servers.count,
            distribution_policy_zones=list(self._cfg.zones), distribution_policy_target_shape="EVEN",
            versions=[gcp.compute.RegionInstanceGroupManagerVersionArgs(instance_template=template.self_link_unique)],
            auto_healing_policies=gcp.compute.RegionInstanceGroupManagerAutoHealingPoliciesArgs(
                health_check=self._api_check.id, initial_delay_sec=cloud.API_BOOT_SECONDS),
            update_policy=gcp.compute.RegionInstanceGroupManagerUpdatePolicyArgs(
                type="PROACTIVE", minimal_action="REPLACE", instance_redistribution_type="PROACTIVE",
                max_surge_fixed=zones, max_unavailable_fixed=0),
            wait_for_instances=False, opts=self._opts)

    # -- load balancers --------------------------------------------------------------
    def _load_balancers(self, members: list[gcp.compute.InstanceGroupManager],
                        api: gcp.compute.RegionInstanceGroupManager | None) -> None:
        """Internal passthrough LB for etcd clients (CLIENT_IP affinity), external one for the API."""
        etcd_backend = gcp.compute.RegionBackendService(
            self._child("etcd-backend"), name=self._child("etcd"), region=self._gce.region,
            load_balancing_scheme="INTERNAL", protocol="TCP", network=self._net.network,
            # The design: a client stays on one member, so it is not bounced between members' views.
            session_affinity="CLIENT_IP", health_checks=self._etcd_check.id,
            backends=[gcp.compute.RegionBackendServiceBackendArgs(group=g.instance_group, balancing_mode="CONNECTION")
                      for g in members], opts=self._opts)
        gcp.compute.ForwardingRule(
            self._child("etcd-lb-rule"), name=self._child("etcd"), region=self._gce.region,
            load_balancing_scheme="INTERNAL", ip_protocol="TCP", ports=[str(CLIENT_PORT)],
            ip_address=self._etcd_lb_address.address, backend_service=etcd_backend.id,
            network=self._net.network, subnetwork=self._net.subnetwork, opts=self._opts)
        api_groups = [api] if api is not None else members
        api_backend = gcp.compute.RegionBackendService(
            self._child("api-backend"), name=self._child("api"), region=self._gce.region,
            load_balancing_scheme="EXTERNAL", protocol="TCP", health_checks=self._api_check.id,
            backends=[gcp.compute.RegionBackendServiceBackendArgs(group=g.instance_group, balancing_mode="CONNECTION")
                      for g in api_groups], opts=self._opts)
        gcp.compute.ForwardingRule(
            self._child("api-lb-rule"), name=self._child("api"), region=self._gce.region,
            load_balancing_scheme="EXTERNAL", ip_protocol="TCP", port_range=str(API_PORT),
            ip_address=self._api_lb_address.address, backend_service=api_backend.id, opts=self._opts)


def _image(image: str) -> pulumi.Input[str]:
    """Pin the family's current image in the template, so a new image is a reviewed change."""
    parts = image.split("/")
    if len(parts) == 6 and parts[0] == "projects" and parts[3:5] == ["images", "family"]:
        return gcp.compute.get_image_output(family=parts[5], project=parts[1]).self_link
    return image


def _etcd_machine(persistent: bool) -> str:
    return "e2-standard-2" if persistent else "n2-standard-4"  # local SSD needs an N-series machine

