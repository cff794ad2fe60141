"""The stack configuration as a typed, validated model.

Everything the program declares is derived from one `ClusterConfig`. It is built and
checked before any resource exists, so a bad value stops `pulumi up` with one message
that names the key, the value and what is allowed. Field-level rules are pydantic types;
rules that relate several keys live in `components/validation.py`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.alias_generators import to_camel

Target = Literal["gce", "aws", "baremetal"]
Role = Literal["etcd", "apiserver", "loadbalancer"]


class ConfigError(Exception):
    """One bad configuration value: the key, the value and what would be allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': value {value!r} is not allowed; allowed: {allowed}")


class Model(BaseModel):
    """Stack config keys are camelCase; unknown keys are errors, models are immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ApiServers(Model):
    count: Annotated[int, Field(ge=1, le=9)] = 3
    machine_type: str | None = None


class Etcd(Model):
    members: Annotated[int, Field(ge=1, le=5)] = 3
    placement: Literal["colocated", "dedicated"] = "dedicated"
    disk: Literal["persistent", "local"] = "persistent"
    version: str = "3.5.33"
    source: Literal["release", "distro"] = "release"
    heartbeat_ms: Annotated[int, Field(ge=10, le=10_000)] = 100
    election_ms: Annotated[int, Field(ge=50, le=50_000)] = 1000
    machine_type: str | None = None
    disk_size_gb: Annotated[int, Field(ge=10, le=1000)] = 20


class Retain(Model):
    recent: Annotated[int, Field(ge=1, le=1000)] = 6
    daily: Annotated[int, Field(ge=0, le=366)] = 7


class Backup(Model):
    interval_minutes: Annotated[int, Field(ge=5, le=1440)] = 30
    retain: Retain = Retain()
    verify: bool = True


class Network(Model):
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    admin_cidrs: list[str] = []
    cluster_domain: str = "cluster.local"

    @property
    def first_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first host address of the service range."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))


class BareMetalHost(Model):
    name: str
    address: str
    zone: str = "default"
    roles: list[Role] = ["etcd", "apiserver", "loadbalancer"]


class BackupHost(Model):
    address: str
    path: str = "/srv/etcd-backups"
    user: str = "etcd-backup"


class BareMetal(Model):
    user: str = "root"
    ssh_private_key: SecretStr | None = None
    ssh_private_key_path: str | None = None
    hosts: list[BareMetalHost]
    spares: list[BareMetalHost] = []
    api_vip: str
    vip_interface: str = "eth0"
    backup_host: BackupHost
    operator_cidrs: list[str] = []
    install_kubelet: bool = True
    spare_takeover_after_seconds: Annotated[int, Field(ge=30, le=86_400)] = 300


class Gce(Model):
    project: str
    region: str
    network: str | None = None
    subnetwork: str | None = None
    subnet_cidr: str = "10.10.0.0/24"
    image: str = "projects/debian-cloud/global/images/family/debian-12"


class Aws(Model):
    region: str
    vpc_cidr: str = "10.20.0.0/16"
    subnet_ids: list[str] = []
    public_api: bool = True


class Pki(Model):
    """Leaf certificates are re-issued (CAs kept) when `rotation` changes."""

    rotation: Annotated[int, Field(ge=0)] = 0
    leaf_validity_hours: Annotated[int, Field(ge=24, le=87_600)] = 8760
    ca_validity_hours: Annotated[int, Field(ge=8760, le=175_200)] = 87_600


class ClusterConfig(Model):
    target: Target
    cluster_name: str
    kubernetes_version: str = "1.36.4"
    resilience: Literal["default", "minimal"] = "default"
    zones: Annotated[list[str], Field(min_length=1, max_length=10)]
    api_servers: ApiServers = ApiServers()
    etcd: Etcd = Etcd()
    backup: Backup = Backup()
    network: Network = Network()
    pki: Pki = Pki()
    baremetal: BareMetal | None = None
    gce: Gce | None = None
    aws: Aws | None = None


def _dotted(loc: tuple[int | str, ...]) -> str:
    """pydantic reports `('etcd', 'members')`; users write `etcd.members`."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _allowed(error: Mapping[str, Any]) -> str:
    """Say what would be accepted, in the user's terms, for one pydantic error."""
    ctx, kind = error.get("ctx") or {}, error["type"]
    bounds = {"greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}",
              "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)"}
    if kind in bounds:
        return bounds[kind].format(**ctx)
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    if kind == "extra_forbidden":
        return "no such key; see the config reference in Pulumi.yaml"
    if kind == "missing":
        return "a value (this key is required)"
    return error["msg"]


def parse(raw: Mapping[str, Any]) -> ClusterConfig:
    """Build the model from raw stack values, turning pydantic's first error into one ConfigError."""
    try:
        return ClusterConfig.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        value = first.get("input") if first["type"] != "missing" else None
        raise ConfigError(_dotted(first["loc"]), value, _allowed(first)) from None


TOP_LEVEL_KEYS: tuple[str, ...] = tuple(
    field.alias or name for name, field in ClusterConfig.model_fields.items()
)
