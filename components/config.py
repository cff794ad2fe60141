"""The stack configuration as a typed, validated model.

Everything the program declares is derived from one `ClusterConfig`. It is built and
checked before any resource exists, so a bad value stops `pulumi up` with one message
that names the key, the value and what is allowed. Field-level rules are pydantic types;
rules that relate several keys live in `components/validation.py`.

Every free-form string ends up in a shell command, a host file, a path or a cloud resource
name, so each is held to an allow-list of the characters and shape its destination takes
(never a deny-list of bad characters). A secret's value never appears in an error.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

Target = Literal["gce", "aws", "baremetal"]
Role = Literal["etcd", "apiserver", "loadbalancer"]


_KEY_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File")


class _Hidden:
    """Stands in for a value that may be a secret."""

    def __repr__(self) -> str:
        return "(not shown: it may be a secret)"


HIDDEN = _Hidden()


def _holds_secret(value: object) -> bool:
    """Key material anywhere in a value, or a secret key's name in a mapping (its value is then a secret)."""
    if isinstance(value, SecretStr):
        return True
    if isinstance(value, str):
        return any(marker in value for marker in _KEY_MARKERS)
    if isinstance(value, Mapping):
        return any(k in SECRET_KEYS or _holds_secret(k) or _holds_secret(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return any(_holds_secret(v) for v in value)
    return False


class ConfigError(Exception):
    """One bad configuration value: the key, the value (never a secret's) and what would be allowed.

    The value is shown escaped to ASCII: one line whatever it holds, and a look-alike (a Cyrillic ie in
    'eth0') shows why it was refused.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        value = HIDDEN if _holds_secret(value) else value
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': value {value!a} is not allowed; allowed: {allowed}")


def _allow_list(pattern: str, allowed: str, max_length: int) -> AfterValidator:
    """A string rule: the whole value (fullmatch: `$` would let a trailing newline through) has this shape."""
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if len(value) > max_length or not regex.fullmatch(value):
            raise PydanticCustomError("allow_list", allowed)
        return value
    return AfterValidator(check)


_LABEL = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"  # RFC 1035: GCE names, host names
_SUBDOMAIN_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"  # RFC 1123
_GCE_PROJECT = r"(?:[a-z][-a-z0-9.]{0,61}[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]"
_LOCAL_SEGMENT = r"(?!\.\.?(?:/|\Z))[A-Za-z0-9._@+][A-Za-z0-9._@+-]{0,254}"

# Host names land in etcd's member list, HAProxy's and keepalived's configs, certificates and commands.
HostName = Annotated[str, _allow_list(_LABEL, "a DNS-1123 label such as h1: a-z, 0-9 and '-', starting with a "
                                      "letter, at most 63 characters", 63)]
# A login name: on the SSH connection, the backup host's `useradd`, an `ssh user@host` command line.
UnixUser = Annotated[str, _allow_list(r"[a-z_][a-z0-9_-]{0,31}", "a Unix user name such as etcd-backup: a-z, 0-9, "
                                      "'_' and '-', starting with a letter or '_', at most 32 characters", 32)]
# keepalived's `interface`: Linux names (IFNAMSIZ 16 with the NUL); the kernel refuses '/', ':' and spaces.
InterfaceName = Annotated[str, _allow_list(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", "a Linux interface name such as "
                                           "eth0 or enp1s0.100: 1 to 15 of A-Z, a-z, 0-9, '_', '.' and '-', not "
                                           "starting with '.' or '-'", 15)]
# A folder on the backup host, made and owned by the backup user: absolute and normalized, so what is
# reviewed is where it lands.
HostPath = Annotated[str, _allow_list(r"(?:/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254})+", "an absolute, normalized path "
                                      "such as /srv/etcd-backups: '/'-separated names of A-Z, a-z, 0-9, '.', '_' "
                                      "and '-', none empty or starting with '.' (no '.' or '..'), no trailing '/'",
                                      1024)]
# A file on the machine that runs Pulumi (read by the program, handed to `ssh -i` by operator tools).
LocalPath = Annotated[str, _allow_list(rf"/?{_LOCAL_SEGMENT}(?:/{_LOCAL_SEGMENT})*", "a file path, absolute or "
                                       "relative to the project, such as /home/me/.ssh/id_ed25519: '/'-separated "
                                       "names of A-Z, a-z, 0-9, '.', '_', '@', '+' and '-' (not starting with '-'), "
                                       "no empty, '.' or '..' name, no '~' (it is not expanded)", 4096)]
MachineType = Annotated[str, _allow_list(r"[a-z][a-z0-9]*(?:[.-][a-z0-9]+)*", "a machine type such as "
                                         "e2-standard-4 (GCE) or m6i.large (AWS): a-z, 0-9, '-' and '.'", 63)]
DnsDomain = Annotated[str, _allow_list(rf"{_SUBDOMAIN_LABEL}(?:\.{_SUBDOMAIN_LABEL})*", "a DNS domain such as "
                                       "cluster.local: dot-separated DNS-1123 labels (a-z, 0-9, '-')", 253)]
GceProject = Annotated[str, _allow_list(_GCE_PROJECT, "a GCE project ID such as my-project: 6 to 30 of a-z, 0-9 "
                                        "and '-', starting with a letter", 100)]
GceRegion = Annotated[str, _allow_list(r"[a-z]+-[a-z]+[0-9]+", "a GCE region such as europe-west1", 63)]
GceName = Annotated[str, _allow_list(_LABEL, "the name of an existing GCE resource, such as shared-vpc: a-z, 0-9 "
                                     "and '-', starting with a letter, at most 63 characters", 63)]
GceImage = Annotated[str, _allow_list(
    rf"(?:projects/{_GCE_PROJECT}/global/images/(?:family/)?|global/images/(?:family/)?|family/)?{_LABEL}",
    "an image such as projects/debian-cloud/global/images/family/debian-12 "
    "(projects/PROJECT/global/images/[family/]NAME, or an image or family of the project)", 200)]
AwsRegion = Annotated[str, _allow_list(r"[a-z]{2}(?:-gov)?-[a-z]+-[0-9]", "an AWS region such as eu-west-1", 32)]


class Model(BaseModel):
    """Stack config keys are camelCase; unknown keys are errors, models are immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ApiServers(Model):
    count: Annotated[int, Field(ge=1, le=9)] = 3
    machine_type: MachineType | None = None


class Etcd(Model):
    members: Annotated[int, Field(ge=1, le=5)] = 3
    placement: Literal["colocated", "dedicated"] = "dedicated"
    disk: Literal["persistent", "local"] = "persistent"
    version: str = "3.5.33"
    source: Literal["release", "distro"] = "release"
    heartbeat_ms: Annotated[int, Field(ge=10, le=10_000)] = 100
    election_ms: Annotated[int, Field(ge=50, le=50_000)] = 1000
    machine_type: MachineType | None = None
    disk_size_gb: Annotated[int, Field(ge=10, le=1000)] = 20


class Retain(Model):
    recent: Annotated[int, Field(ge=1, le=1000)] = 6
    daily: Annotated[int, Field(ge=0, le=366)] = 7


class Backup(Model):
    interval_minutes: Annotated[int, Field(ge=5, le=1440)] = 30
    retain: Retain = Retain()
    verify: bool = True
    # The delta log: a chunk of the revisions written is shipped this often to the backup host or bucket: the RPO.
    delta_seconds: Annotated[int, Field(ge=1, le=300)] = 10


class Network(Model):
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    admin_cidrs: list[str] = []
    cluster_domain: DnsDomain = "cluster.local"

    @property
    def first_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first host address of the service range."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))


class BareMetalHost(Model):
    name: HostName
    address: str
    zone: str = "default"
    roles: list[Role] = ["etcd", "apiserver", "loadbalancer"]
    host_key: str | None = None  # its SSH host key, pinned: `ssh-ed25519 AAAA...` (components/validation.py)


class BackupHost(Model):
    address: str
    path: HostPath = "/srv/etcd-backups"
    user: UnixUser = "etcd-backup"
    host_key: str | None = None


class BareMetal(Model):
    user: UnixUser = "root"
    ssh_private_key: SecretStr | None = None
    ssh_private_key_path: LocalPath | None = None
    hosts: list[BareMetalHost]
    spares: list[BareMetalHost] = []
    api_vip: str
    vip_interface: InterfaceName = "eth0"
    backup_host: BackupHost
    operator_cidrs: list[str] = []
    monitoring_cidrs: list[str] = []  # Prometheus: etcd's metrics (2381) and the agent's (2382)
    install_kubelet: bool = True
    spare_takeover_after_seconds: Annotated[int, Field(ge=30, le=86_400)] = 300
    # Hosts without hostKey are pinned to the key they report at first contact (targets/baremetal.py).
    trust_on_first_use: bool = False


class Gce(Model):
    project: GceProject
    region: GceRegion
    network: GceName | None = None
    subnetwork: GceName | None = None
    subnet_cidr: str = "10.10.0.0/24"
    image: GceImage = "projects/debian-cloud/global/images/family/debian-12"


class Aws(Model):
    region: AwsRegion
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


def _secret_keys(model: type[BaseModel]) -> set[str]:
    """Names and aliases of every SecretStr field, at any depth."""
    def kinds(annotation: Any) -> set[Any]:
        return {annotation}.union(*(kinds(a) for a in get_args(annotation)))
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        for kind in kinds(field.annotation):
            if kind is SecretStr:
                keys |= {name, field.alias or name}
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                keys |= _secret_keys(kind)
    return keys


SECRET_KEYS: frozenset[str] = frozenset(_secret_keys(ClusterConfig))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _dotted(loc: tuple[int | str, ...]) -> str:
    """pydantic reports `('etcd', 'members')`; users write `etcd.members`. An unknown key is the user's own
    text: shown escaped, on one line, unless it is key material."""
    key = ""
    for part in loc:
        if isinstance(part, str) and not _PLAIN_KEY.fullmatch(part):
            part = repr(HIDDEN) if _holds_secret(part) else ascii(part[:64])
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _shown(error: Mapping[str, Any]) -> object:
    """The value to name: none for a missing key, hidden for a secret's, and for an unknown key's (a misspelt
    secret key still holds the secret)."""
    if error["type"] == "missing":
        return None
    secret = any(part in SECRET_KEYS for part in error["loc"])
    return HIDDEN if secret or error["type"] == "extra_forbidden" else error.get("input")


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
    """Build the model from raw stack values, turning pydantic's first error into one ConfigError.

    Raised outside the `except`: the ValidationError, which holds every input (secrets too), is not chained to it.
    """
    try:
        return ClusterConfig.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        problem = _dotted(first["loc"]), _shown(first), _allowed(first)
    raise ConfigError(*problem)


TOP_LEVEL_KEYS: tuple[str, ...] = tuple(
    field.alias or name for name, field in ClusterConfig.model_fields.items()
)
