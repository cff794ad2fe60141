"""What the GCE and AWS targets share: slots, secret and object names, bundles, retention, boot.

Both clouds run the same machines: one group per etcd member (its *slot*, named after the
topology's machine) and one group for the API servers (one shared slot). A slot's secret is
a bundle of its host files, named like the slot, so a booting machine needs to know only
its slot. Nothing here declares a resource; the targets turn these facts into their cloud's
resources, so the two target modules differ only where the clouds do.

Machines run as one cloud identity per role (GCE service account, AWS instance role): `etcd` for the
members, `api` for the API servers, `cp` for colocated members (which hold both roles' keys anyway). An
identity reads the host programs and its own slots' bundles only: an internet-facing API server cannot
read a member's peer and server keys, nor a member the Kubernetes CA key. Only the identity that runs
etcd writes backups and the cluster-formed marker (on AWS it also attaches the members' volumes and
interfaces). Members share their identity, so one can read another's bundle: each already holds the
whole keyspace and a peer certificate the others trust, so a peer's keys add little, while an
identity per member would need a machine template per member.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pulumi

from components import versions
from components.config import ClusterConfig
from components.facts import cluster_facts
from components.naming import resource_name
from components.pki import Endpoints
from components.render import boot
from components.render.agent import agent_files
from components.render.etcd import CLIENT_PORT, METRICS_PORT
from components.render.hostfiles import (
    Cluster,
    Credentials,
    HostFile,
    apiserver_files,
    bundle,
    etcd_member_files,
    text_files,
)
from components.render.kubernetes import API_PORT, apiserver_flags
from components.targets import Deployed, SharedAssets
from components.topology import Machine, Topology
from kcp_host.contract import BootEnv, SlotEnv, render_env

# Both secret stores hold at most 64 KiB per version (Secret Manager: 64 KiB; Secrets Manager: 65,536 bytes).
SECRET_MAX_BYTES = 65_536
# Boot to healthy, measured from the boot path's steps: etcd = release download + join;
# API servers add containerd, kubelet and image pulls. Autohealing and ASG grace wait this long.
ETCD_BOOT_SECONDS = 600
API_BOOT_SECONDS = 900
ETCD_DATA_DEVICE = "etcd-data"
ETCD_LB_PORTS = (CLIENT_PORT, METRICS_PORT)  # client traffic and the /health probes


# The cloud identity a slot's machines run as, by the slot's roles (module docstring).
IDENTITIES = {("etcd",): "etcd", ("apiserver",): "api", ("etcd", "apiserver"): "cp"}


@dataclass(frozen=True)
class Slot:
    """One identity that a group keeps filled: an etcd member, or the API servers' shared one."""

    name: str
    roles: tuple[str, ...]
    machine: Machine | None = None  # None for the API server group (instances are interchangeable)

    def has(self, role: str) -> bool:
        return role in self.roles

    @property
    def identity(self) -> str:
        return IDENTITIES[self.roles]


def slots(cfg: ClusterConfig, topology: Topology) -> list[Slot]:
    """etcd member slots (carrying the API server too when colocated), then the API group's slot."""
    colocated = cfg.etcd.placement == "colocated"
    roles = ("etcd", "apiserver") if colocated else ("etcd",)
    result = [Slot(m.name, roles, m) for m in topology.etcd_members]
    if not colocated:
        result.append(Slot(api_slot(cfg.cluster_name), ("apiserver",)))
    return result


def api_slot(cluster: str) -> str:
    return resource_name(cluster, "api")


@functools.cache
def programs_parts() -> tuple[str, ...]:
    """The host agent travels as a bundle too (fetched by kcp-bootstrap: no user data limit), its text cut
    in pieces of whole base64 quads that each fit a secret, so the agent may outgrow one secret."""
    payload, size = bundle(agent_files()), SECRET_MAX_BYTES - SECRET_MAX_BYTES % 4
    return tuple(payload[i:i + size] for i in range(0, len(payload), size))


def programs_secrets(cluster: str) -> list[str]:
    """`<cluster>-host-programs`, then `-2`, `-3`... as the agent needs."""
    first = resource_name(cluster, "host-programs")
    return [first, *(f"{first}-{i}" for i in range(2, len(programs_parts()) + 1))]


def identity_secrets(cluster: str, slots: list[Slot]) -> dict[str, list[str]]:
    """Identity -> the secrets its machines may read: the host programs (no key in them), then only its own slots'
    bundles, each granted on its own."""
    return {identity: [*programs_secrets(cluster), *(s.name for s in slots if s.identity == identity)]
            for identity in dict.fromkeys(s.identity for s in slots)}


def etcd_identity(slots: list[Slot]) -> str:
    """The identity of the machines that run etcd: the only one that writes backups and the cluster-formed marker."""
    return next(s.identity for s in slots if s.has("etcd"))


# Up to release be3abab one identity, named `control-plane`, ran every machine; later releases name the members'
# identity by its role. Members never roll on a template change (docs/cloud-targets.md): under a new identity they would
# keep running as a deleted one, unable to refresh or back up. So the members' identity takes the shared one's
# resources over (aliases) and keeps whatever physical name it already has (ignore_changes on the name): an upgrade
# from either release narrows its grants in place, and only the API servers move to a new identity (and roll).
SHARED_IDENTITY = "control-plane"


def inherits_shared_identity(identity: str, slots: list[Slot]) -> bool:
    return identity == etcd_identity(slots)


def formerly(inherited: bool, name: str, *physical_name: str) -> pulumi.ResourceOptions:
    """For the inheriting identity's resources: alias to `name`, the shared identity's name for it, and keep the
    existing object's `physical_name` inputs (a new cluster gets the declared ones)."""
    if not inherited:
        return pulumi.ResourceOptions()
    return pulumi.ResourceOptions(aliases=[pulumi.Alias(name=name)], ignore_changes=list(physical_name) or None)


def role_tag(cluster: str, role: str) -> str:
    """Network tag / tag value that firewall rules and policies select machines by."""
    return resource_name(cluster, role)


def backup_prefix(cluster: str) -> str:
    """Hosts add `snapshots/<name>.db|.json`, `bad/...` and `status/<stamp>-<host>.json` below it, never replace."""
    return f"{cluster}/backups"


def delta_prefix(cluster: str) -> str:
    """The delta log below the backup prefix: `<cluster ID>/<first revision>.delta`, one log per etcd cluster
    (kcp_host/destinations.py's Bucket.delta); the members may list it (and head its chunks on S3)."""
    return f"{backup_prefix(cluster)}/deltas"


def marker_key(cluster: str) -> str:
    """Outside the backup prefix, so hosts that may overwrite backups cannot delete it."""
    return f"{cluster}/cluster-formed"


def resolved_cluster(cfg: ClusterConfig, topology: Topology, endpoints: Endpoints,
                     backup_url: pulumi.Input[str]) -> pulumi.Output[Cluster]:
    """The renderer's facts once the cloud has allocated the addresses the certificates name."""
    names = list(endpoints.member_addresses)
    values = [endpoints.member_addresses[n] for n in names]
    return pulumi.Output.all(endpoints.api_host, backup_url, *values).apply(
        lambda v: cluster_facts(cfg, topology, dict(zip(names, v[2:], strict=True)), v[0], v[1]))


def slot_env(cfg: ClusterConfig, cluster: Cluster, slot: Slot) -> HostFile:
    """The releases travel in the bundle, not the boot settings: a running machine re-fetches its bundle
    (`kcp-host cloud-refresh`), never its template, so a version change reaches it too. An API server also gets
    etcd's release and kube-apiserver's own etcd client: its etcdctl takes the rollout lock."""
    settings: dict[str, Any] = {
        "name": slot.name,
        "etcd_install": ("release", cfg.etcd.version, versions.ETCD_SHA256["amd64"][cfg.etcd.version])}
    if slot.has("apiserver"):
        settings["kubelet_install"] = tuple(versions.kubelet_release_args(cfg.kubernetes_version).split())
    if not slot.has("etcd"):
        flags = apiserver_flags(cluster.api)
        settings["etcd_endpoints"] = tuple(flags["etcd-servers"].split(","))
        settings["etcd_client"] = tuple(flags[f"etcd-{name}"] for name in ("cafile", "certfile", "keyfile"))
    return HostFile(SlotEnv.PATH, render_env(SlotEnv(**settings), "Rendered by resilient-control-plane: this "
                                             "slot's releases, read at boot and by every refresh (no secret)."))


def slot_files(cfg: ClusterConfig, cluster: Cluster, slot: Slot, creds: Credentials) -> list[HostFile]:
    files = [slot_env(cfg, cluster, slot)]
    if slot.has("etcd"):
        me = next(m for m in cluster.members if m.name == slot.name)
        files += etcd_member_files(cluster, me, creds) + text_files(boot.membership_units())
    if slot.has("apiserver"):
        files += apiserver_files(cluster, creds)
    return files


def checked_bundle(name: str, files: list[HostFile]) -> str:
    payload = bundle(files)
    if len(payload) > SECRET_MAX_BYTES:
        raise ValueError(f"bundle {name} is {len(payload)} bytes, over the secret stores' {SECRET_MAX_BYTES}")
    return payload


def secret_payloads(cfg: ClusterConfig, topology: Topology, cluster: pulumi.Output[Cluster],
                    credentials: pulumi.Output[Credentials]) -> dict[str, pulumi.Output[str]]:
    """Secret name -> bundle: the host agent, then one bundle per slot (secret: it holds keys)."""
    payloads = {name: pulumi.Output.from_input(part)
                for name, part in zip(programs_secrets(cfg.cluster_name), programs_parts(), strict=True)}
    for slot in slots(cfg, topology):
        payloads[slot.name] = pulumi.Output.secret(pulumi.Output.all(cluster, credentials).apply(
            lambda v, slot=slot: checked_bundle(slot.name, slot_files(cfg, v[0], slot, v[1]))))
    return payloads


def boot_settings(cfg: ClusterConfig, slot: Slot, marker_url: pulumi.Input[str],
                  forward_ports: tuple[int, ...]) -> dict[str, Any]:
    """`BootEnv` values (some still Outputs) common to both clouds; each target adds its provider's few. Releases
    are not among them: they are in the slot's bundle (`slot_env`)."""
    return {
        "cluster": cfg.cluster_name,
        "roles": slot.roles,
        "programs_secrets": tuple(programs_secrets(cfg.cluster_name)),
        "disk": cfg.etcd.disk,
        "marker": marker_url,
        "wait_seconds": ETCD_BOOT_SECONDS,
        "forward_ports": tuple(str(p) for p in forward_ports),
    }


def lb_ports(slot: Slot) -> tuple[int, ...]:
    """Ports that a destination-preserving load balancer delivers to a slot's machines."""
    return (*(ETCD_LB_PORTS if slot.has("etcd") else ()), *((API_PORT,) if slot.has("apiserver") else ()))


def startup_script(provider: str, settings: dict[str, Any], max_bytes: int | None = None) -> pulumi.Output[str]:
    keys = list(settings)
    return pulumi.Output.all(*settings.values()).apply(
        lambda v: boot.boot_script(BootEnv(provider=provider, **{
            k: tuple(x) if isinstance(x, list) else x for k, x in zip(keys, v, strict=True)}), max_bytes))


def lock_days(cfg: ClusterConfig) -> int:
    """How long the backup bucket's retention lock (S3 Object Lock, GCS retention policy) keeps every object: the
    daily history, long enough for `retain.recent` snapshots at the backup interval, at least a day. Nothing
    deletes or replaces an object sooner: not a host, not the lifecycle rules. docs/backups.md."""
    retain = cfg.backup.retain
    return max(retain.daily, math.ceil(retain.recent * cfg.backup.interval_minutes / 1440), 1)


@dataclass(frozen=True)
class ExpiryRule:
    """Lifecycle of the objects under `prefix`: delete each `days` after its creation, once its lock has ended
    (S3: the current version, then its noncurrent ones a day later). docs/backups.md has the layout."""

    prefix: str
    days: int


def retention_rules(cfg: ClusterConfig) -> list[ExpiryRule]:
    """One object per snapshot under new keys: retention is by age, a day past the lock; so the bucket holds
    every snapshot of the last `lock_days`, which is at least the newest `retain.recent` and the first of each of
    the newest `retain.daily` days. The whole prefix, so objects of the earlier fixed-key layout expire too."""
    return [ExpiryRule(f"{backup_prefix(cfg.cluster_name)}/", lock_days(cfg) + 1)]


def client_endpoints(endpoints: Endpoints, topology: Topology) -> pulumi.Output[list[str]]:
    addresses = [endpoints.member_addresses[m.name] for m in topology.etcd_members]
    return pulumi.Output.all(*addresses).apply(lambda a: [f"https://{x}:{CLIENT_PORT}" for x in a])


def api_endpoint(endpoints: Endpoints) -> pulumi.Output[str]:
    return pulumi.Output.from_input(endpoints.api_host).apply(lambda h: f"https://{h}:{API_PORT}")


class CloudTarget(ABC):
    """The order in which every cloud target declares its resources; each cloud fills in the steps.

    Keeping the sequence here is what makes the GCE and AWS modules line up step by step.
    """

    _endpoints: Endpoints
    _backup_url: pulumi.Output[str]

    def __init__(self, name: str, cfg: ClusterConfig, topology: Topology, parent: pulumi.Resource) -> None:
        self._name, self._cfg, self._topology = name, cfg, topology
        self._opts = pulumi.ResourceOptions(parent=parent)
        self._slots = slots(cfg, topology)

    def _child(self, *kind: str) -> str:
        return resource_name(self._cfg.cluster_name, *kind)

    def deploy(self, assets: SharedAssets) -> Deployed:
        self._identities()
        self._backup_bucket()
        self._secrets(assets)
        self._health_checks()
        members = self._etcd_member_groups()
        api = self._api_server_group()
        self._load_balancers(members, api)
        return Deployed(api_endpoint=api_endpoint(self._endpoints),
                        etcd_client_endpoints=client_endpoints(self._endpoints, self._topology),
                        backup_location=self._backup_url)

    @abstractmethod
    def _identities(self) -> None: ...

    @abstractmethod
    def _backup_bucket(self) -> None: ...

    @abstractmethod
    def _secrets(self, assets: SharedAssets) -> None: ...

    @abstractmethod
    def _health_checks(self) -> None: ...

    @abstractmethod
    def _etcd_member_groups(self) -> list[Any]: ...

    @abstractmethod
    def _api_server_group(self) -> Any | None: ...

    @abstractmethod
    def _load_balancers(self, members: list[Any], api: Any | None) -> None: ...
