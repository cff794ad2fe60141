"""Rules that relate several config keys, checked before anything is declared.

Each rule raises one `ConfigError` naming the key, the value and what is allowed. The
rules encode the design: a quorum that survives one machine (3 or 5 members), no zone
that holds a quorum by itself, etcd's timing rules, and bare-metal hosts that can
really carry the roles asked of them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from components import versions
from components.config import BareMetal, ClusterConfig, ConfigError, parse
from components.naming import CLUSTER_NAME_MAX
from components.topology import plan, quorum

# Patterns are applied with fullmatch: `$` also matches before a trailing newline.
_DNS_LABEL = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ZONE_PATTERNS = {
    "gce": (re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]"), "a GCE zone such as europe-west1-b"),
    "aws": (re.compile(r"[a-z]{2}(?:-gov)?-[a-z]+-[0-9][a-z]"), "an AWS zone such as eu-west-1a"),
    "baremetal": (_DNS_LABEL, "a lowercase failure-domain label such as rack-a (at most 63 characters)"),
}
# The backup user owns <backupHost.path>/<clusterName>: never one of these, nor a folder inside or above one.
_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
                "/sbin", "/sys", "/tmp", "/usr", "/var/cache", "/var/lib", "/var/log", "/var/mail", "/var/run",
                "/var/spool", "/var/tmp")


def load(raw: Mapping[str, Any]) -> ClusterConfig:
    """Parse and check a stack's raw config; the only way the program gets a ClusterConfig."""
    cfg = parse(raw)
    for rule in (_names_and_versions, _sizes, _etcd_timing, _zones, _networks, _target_sections):
        rule(cfg)
    if cfg.baremetal is not None:
        _baremetal(cfg, cfg.baremetal)
    _cloud_networks(cfg)
    _zone_spread(cfg)
    return cfg


def _names_and_versions(cfg: ClusterConfig) -> None:
    if len(cfg.cluster_name) > CLUSTER_NAME_MAX or not _DNS_LABEL.fullmatch(cfg.cluster_name):
        raise ConfigError("clusterName", cfg.cluster_name,
                          f"a DNS-1123 label starting with a letter, at most {CLUSTER_NAME_MAX} characters")
    known = sorted(versions.KUBELET_SHA256["amd64"])
    if cfg.kubernetes_version not in known:
        raise ConfigError("kubernetesVersion", cfg.kubernetes_version, f"one of {known}")
    if cfg.etcd.source == "distro":
        if cfg.target != "baremetal":
            raise ConfigError("etcd.source", "distro", "'release' on cloud targets (images carry no etcd package)")
        allowed = sorted(versions.DISTRO_ETCD_PACKAGES)
    else:
        allowed = sorted(versions.ETCD_SHA256["amd64"])
    if cfg.etcd.version not in allowed:
        raise ConfigError("etcd.version", cfg.etcd.version, f"one of {allowed} with etcd.source={cfg.etcd.source}")


def _sizes(cfg: ClusterConfig) -> None:
    minimal = cfg.resilience == "minimal"
    members_ok = {1, 3, 5} if minimal else {3, 5}
    if cfg.etcd.members not in members_ok:
        allowed = "3 or 5 (1 only with resilience: minimal)" if not minimal else "1, 3 or 5"
        raise ConfigError("etcd.members", cfg.etcd.members, allowed)
    if cfg.api_servers.count < (1 if minimal else 2):
        raise ConfigError("apiServers.count", cfg.api_servers.count, ">= 2 (1 only with resilience: minimal)")
    if cfg.etcd.placement == "colocated" and cfg.target != "baremetal" \
            and cfg.api_servers.count != cfg.etcd.members:
        raise ConfigError("apiServers.count", cfg.api_servers.count,
                          f"{cfg.etcd.members} (equal to etcd.members when etcd.placement is colocated)")
    if cfg.backup.retain.recent + cfg.backup.retain.daily < 1:
        raise ConfigError("backup.retain", cfg.backup.retain.model_dump(), "at least one snapshot kept")


def _etcd_timing(cfg: ClusterConfig) -> None:
    """etcd's tuning guide: election timeout at least 5x the heartbeat, at most 50 s."""
    hb, el = cfg.etcd.heartbeat_ms, cfg.etcd.election_ms
    if el < 5 * hb:
        raise ConfigError("etcd.electionMs", el, f">= 5 x etcd.heartbeatMs ({5 * hb}) and <= 50000")


def _zones(cfg: ClusterConfig) -> None:
    pattern, what = _ZONE_PATTERNS[cfg.target]
    for i, zone in enumerate(cfg.zones):
        if not pattern.fullmatch(zone):
            raise ConfigError(f"zones[{i}]", zone, what)
    dupes = [z for z, n in Counter(cfg.zones).items() if n > 1]
    if dupes:
        raise ConfigError("zones", cfg.zones, f"each zone once (repeated: {dupes[0]})")
    region = {"gce": cfg.gce.region if cfg.gce else None, "aws": cfg.aws.region if cfg.aws else None}
    expected = region.get(cfg.target)
    for i, zone in enumerate(cfg.zones):
        if expected and zone.rsplit("-", 1)[0] != expected and zone[:-1] != expected:
            raise ConfigError(f"zones[{i}]", zone, f"a zone of region {expected}")


def _network(key: str, value: str) -> ipaddress.IPv4Network:
    """The value as written reaches nftables, firewall rules and flags: only the canonical `a.b.c.d/n` form."""
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        net = None
    if not isinstance(net, ipaddress.IPv4Network) or str(net) != value:
        raise ConfigError(key, value, "an IPv4 CIDR a.b.c.d/n with no host bits set, e.g. 10.96.0.0/12")
    return net


def _networks(cfg: ClusterConfig) -> None:
    pods = _network("network.podCidr", cfg.network.pod_cidr)
    services = _network("network.serviceCidr", cfg.network.service_cidr)
    if services.prefixlen < 12:
        raise ConfigError("network.serviceCidr", cfg.network.service_cidr, "a prefix of /12 or longer")
    if pods.overlaps(services):
        raise ConfigError("network.serviceCidr", cfg.network.service_cidr,
                          f"a range that does not overlap network.podCidr ({cfg.network.pod_cidr})")
    for i, cidr in enumerate(cfg.network.admin_cidrs):
        _network(f"network.adminCidrs[{i}]", cidr)


def _target_sections(cfg: ClusterConfig) -> None:
    sections = {"baremetal": cfg.baremetal, "gce": cfg.gce, "aws": cfg.aws}
    if sections[cfg.target] is None:
        raise ConfigError(cfg.target, None, f"a '{cfg.target}' section, required by target: {cfg.target}")
    for name, section in sections.items():
        if name != cfg.target and section is not None:
            raise ConfigError(name, "(section present)", f"only the '{cfg.target}' section with target: {cfg.target}")
    if cfg.target == "baremetal" and cfg.etcd.disk != "local":
        raise ConfigError("etcd.disk", cfg.etcd.disk, "'local' on bare metal (there are no remote disks to re-attach)")


def _address(key: str, value: str) -> ipaddress.IPv4Address:
    """The value as written reaches templates and commands: only the canonical dotted quad."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if not isinstance(address, ipaddress.IPv4Address) or str(address) != value:
        raise ConfigError(key, value, "an IPv4 address such as 10.0.0.11")
    return address


def _unique(key: str, values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ConfigError(f"{key}[{i}]", value, f"a {what} not used by another host")
        seen.add(value)


def _baremetal(cfg: ClusterConfig, bm: BareMetal) -> None:
    if (bm.ssh_private_key is None) == (bm.ssh_private_key_path is None):
        raise ConfigError("baremetal.sshPrivateKey", "(both or neither set)",
                          "exactly one of baremetal.sshPrivateKey (secret) and baremetal.sshPrivateKeyPath")
    everyone = [*bm.hosts, *bm.spares]
    keys = [f"baremetal.hosts[{i}]" for i in range(len(bm.hosts))] + \
           [f"baremetal.spares[{i}]" for i in range(len(bm.spares))]
    for key, host in zip(keys, everyone, strict=True):
        _address(f"{key}.address", host.address)
        if host.zone not in cfg.zones:
            raise ConfigError(f"{key}.zone", host.zone, f"one of zones {cfg.zones}")
    _unique("baremetal.hosts.name", [h.name for h in everyone], "name")
    _unique("baremetal.hosts.address", [h.address for h in everyone], "address")
    _baremetal_roles(cfg, bm)
    _baremetal_addresses(cfg, bm)
    _host_keys(bm)
    _backup_receiver(cfg, bm)


def _baremetal_roles(cfg: ClusterConfig, bm: BareMetal) -> None:
    count = Counter(role for h in bm.hosts for role in h.roles)
    if count["etcd"] != cfg.etcd.members:
        raise ConfigError("baremetal.hosts", f"{count['etcd']} host(s) with role etcd",
                          f"exactly etcd.members ({cfg.etcd.members}) hosts with role etcd")
    if count["apiserver"] != cfg.api_servers.count:
        raise ConfigError("baremetal.hosts", f"{count['apiserver']} host(s) with role apiserver",
                          f"exactly apiServers.count ({cfg.api_servers.count}) hosts with role apiserver")
    needed = 1 if cfg.resilience == "minimal" else 2
    if count["loadbalancer"] < needed:
        raise ConfigError("baremetal.hosts", f"{count['loadbalancer']} host(s) with role loadbalancer",
                          f"at least {needed} (the API VIP needs a second holder to fail over to)")
    for i, host in enumerate(bm.hosts):
        colocated = {"etcd", "apiserver"} <= set(host.roles)
        if cfg.etcd.placement == "dedicated" and colocated:
            raise ConfigError(f"baremetal.hosts[{i}].roles", host.roles,
                              "etcd or apiserver, not both, with etcd.placement: dedicated")
        if cfg.etcd.placement == "colocated" and "etcd" in host.roles and not colocated:
            raise ConfigError(f"baremetal.hosts[{i}].roles", host.roles,
                              "etcd together with apiserver, with etcd.placement: colocated")


def _baremetal_addresses(cfg: ClusterConfig, bm: BareMetal) -> None:
    vip = _address("baremetal.apiVip", bm.api_vip)
    taken = {h.address for h in [*bm.hosts, *bm.spares]} | {bm.backup_host.address}
    if str(vip) in taken:
        raise ConfigError("baremetal.apiVip", bm.api_vip, "an unused address (this one belongs to a host)")
    backup = _address("baremetal.backupHost.address", bm.backup_host.address)
    etcd_hosts = {h.address for h in bm.hosts if "etcd" in h.roles}
    if str(backup) in etcd_hosts:
        raise ConfigError("baremetal.backupHost.address", bm.backup_host.address,
                          "a host that is not an etcd member (a backup must not die with a member)")
    for i, cidr in enumerate(bm.operator_cidrs):
        _network(f"baremetal.operatorCidrs[{i}]", cidr)
    for i, cidr in enumerate(bm.monitoring_cidrs):
        _network(f"baremetal.monitoringCidrs[{i}]", cidr)


def _backup_receiver(cfg: ClusterConfig, bm: BareMetal) -> None:
    """`kcp-host backup-host-setup` runs as root on the backup host: it makes backupHost.user (useradd if new),
    replaces that user's authorized_keys with the forced command and gives it <path>/<clusterName>."""
    bh = bm.backup_host
    if bh.user in ("root", bm.user):
        raise ConfigError("baremetal.backupHost.user", bh.user,
                          f"a user of its own, not root or baremetal.user ({bm.user}): its authorized_keys is "
                          "replaced by a forced command that can only add backups")
    folder = f"{bh.path}/{cfg.cluster_name}"
    near = [d for d in _SYSTEM_DIRS if folder == d or folder.startswith(f"{d}/") or d.startswith(f"{folder}/")]
    if near or bh.path == "/home":
        raise ConfigError("baremetal.backupHost.path", bh.path,
                          f"a folder for backups, such as /srv/etcd-backups: the backup user will own {folder}, "
                          f"which must not be, hold or lie in a system directory ({', '.join(_SYSTEM_DIRS)}) "
                          "or be a home directory")


_KEY_FILE_MAX_BYTES = 65_536  # an RSA 16384 key is under 13 KB


def ssh_key_file(cfg: ClusterConfig) -> None:
    """baremetal.sshPrivateKeyPath names a readable private key. Checked by `pulumi up` (components/stack_config.py)
    before anything is declared; offline tools read stack files on machines that hold no key."""
    path = cfg.baremetal.ssh_private_key_path if cfg.baremetal else None
    if path is None:
        return
    key = Path(path)
    try:
        if key.exists() and not key.is_file():  # a directory, or a device or pipe that never ends
            problem = "it is not a regular file"
        else:
            with key.open("rb") as file:
                text = file.read(_KEY_FILE_MAX_BYTES + 1)
            problem = "it is empty" if not text.strip() else \
                f"it is larger than {_KEY_FILE_MAX_BYTES} bytes" if len(text) > _KEY_FILE_MAX_BYTES else \
                None if b"PRIVATE KEY-----" in text else "it holds no OpenSSH or PEM private key (the .pub file?)"
    except FileNotFoundError:
        problem = "there is no such file"
    except OSError as error:
        problem = f"it cannot be read ({error.strerror})"
    if problem:
        raise ConfigError("baremetal.sshPrivateKeyPath", path,
                          f"a readable, non-empty private key file; {Path(path).absolute()}: {problem}")


# The host key types that pulumi-command (v1.2.1, connection.go) can verify: it offers the server only the pinned
# key's own type as host key algorithm, and for RSA that is `ssh-rsa` (SHA-1), which OpenSSH >= 8.8 refuses to sign.
# Type -> the curve its blob names (ECDSA) and the length of its public key.
HOST_KEY_TYPES: dict[str, tuple[bytes | None, int]] = {
    "ssh-ed25519": (None, 32),
    "ecdsa-sha2-nistp256": (b"nistp256", 65),
    "ecdsa-sha2-nistp384": (b"nistp384", 97),
    "ecdsa-sha2-nistp521": (b"nistp521", 133),
}
_HOST_KEY = re.compile(r"(?P<type>[a-z0-9-]{1,40}) (?P<blob>[A-Za-z0-9+/]{1,2000}={0,2})"
                       r"(?: [A-Za-z0-9@._:+=-]{1,100})?")
HOST_KEY_ALLOWED = ("an OpenSSH public host key line `TYPE BASE64 [COMMENT]` (no options, no host name, one line) of "
                    f"type {', '.join(HOST_KEY_TYPES)}, e.g. the host's /etc/ssh/ssh_host_ed25519_key.pub, checked "
                    "out of band")


def _ssh_fields(blob: bytes) -> list[bytes] | None:
    """The length-prefixed strings of an SSH wire-format key; None when the lengths do not add up."""
    fields, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at:at + 4], "big")
        if at + 4 + size > len(blob):
            return None
        fields.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    return fields


def _check_host_key(key: str, value: str) -> None:
    """A pinned host key is allowed only in the shape that pulumi-command and OpenSSH both verify."""
    shape = _HOST_KEY.fullmatch(value)
    kind = shape["type"] if shape else value.split(" ", 1)[0]
    if kind == "ssh-rsa":
        raise ConfigError(key, value, f"{HOST_KEY_ALLOWED}; ssh-rsa cannot be verified (pulumi-command would offer "
                          "only the SHA-1 `ssh-rsa` algorithm, which OpenSSH >= 8.8 refuses): pin the ed25519 key")
    if shape is None or kind not in HOST_KEY_TYPES:
        raise ConfigError(key, value, HOST_KEY_ALLOWED)
    try:
        fields = _ssh_fields(base64.b64decode(shape["blob"], validate=True))
    except ValueError:
        fields = None
    curve, size = HOST_KEY_TYPES[kind]
    wanted = [kind.encode(), *([curve] if curve else [])]
    if fields is None or fields[:-1] != wanted or len(fields[-1]) != size or (curve and fields[-1][:1] != b"\x04"):
        raise ConfigError(key, value, f"{HOST_KEY_ALLOWED}; this base64 is not a {kind} public key")


def _host_keys(bm: BareMetal) -> None:
    """Every host the program connects to is pinned, unless trustOnFirstUse lets the first contact pin it."""
    hosts = [(f"baremetal.hosts[{i}].hostKey", h.host_key) for i, h in enumerate(bm.hosts)]
    hosts += [(f"baremetal.spares[{i}].hostKey", h.host_key) for i, h in enumerate(bm.spares)]
    hosts.append(("baremetal.backupHost.hostKey", bm.backup_host.host_key))
    for key, value in hosts:
        if value is not None:
            _check_host_key(key, value)
        elif not bm.trust_on_first_use:
            raise ConfigError(key, None, f"{HOST_KEY_ALLOWED}: every connection verifies it before a secret is sent; "
                              "or baremetal.trustOnFirstUse: true to pin the key a host reports at its first contact")


_AWS_SUBNET = re.compile(r"subnet-[0-9a-f]{8,17}")


def _cloud_networks(cfg: ClusterConfig) -> None:
    """An existing network is named completely: GCE network with its subnetwork, AWS one subnet per zone."""
    if cfg.gce is not None:
        _network("gce.subnetCidr", cfg.gce.subnet_cidr)
        if (cfg.gce.network is None) != (cfg.gce.subnetwork is None):
            raise ConfigError("gce.subnetwork", cfg.gce.subnetwork,
                              "set together with gce.network (an existing network and its subnetwork), or neither")
    if cfg.aws is not None:
        if _network("aws.vpcCidr", cfg.aws.vpc_cidr).prefixlen > 24:
            raise ConfigError("aws.vpcCidr", cfg.aws.vpc_cidr, "a prefix of /24 or shorter (16 subnets come from it)")
        ids = cfg.aws.subnet_ids
        if ids and cfg.aws.public_api:
            raise ConfigError("aws.publicApi", True, "false with aws.subnetIds (an internet-facing NLB needs "
                              "public subnets, which the program only creates in its own VPC)")
        if ids and len(ids) != len(cfg.zones):
            raise ConfigError("aws.subnetIds", ids,
                              f"one private subnet per zone, in the order of zones ({len(cfg.zones)})")
        for i, subnet in enumerate(ids):
            if not _AWS_SUBNET.fullmatch(subnet):
                raise ConfigError(f"aws.subnetIds[{i}]", subnet, "a subnet ID such as subnet-0123456789abcdef0")


def _zone_spread(cfg: ClusterConfig) -> None:
    """With several zones, losing any one must leave an etcd quorum and an API server."""
    if cfg.resilience == "minimal" or len(cfg.zones) < 2:
        return
    topology = plan(cfg)
    members = len(topology.etcd_members)
    for zone, count in sorted(topology.count_per_zone("etcd").items()):
        if members - count < quorum(members):
            raise ConfigError("zones", cfg.zones,
                              f"a spread where no zone holds a quorum: zone {zone} would hold {count} of "
                              f"{members} etcd members, so losing it loses quorum ({quorum(members)} needed); "
                              "use at least 3 zones")
    for role, what in (("apiserver", "API servers"), ("loadbalancer", "load balancers (API VIP holders)")):
        per_zone = topology.count_per_zone(role)
        if len(per_zone) == 1:
            zone = next(iter(per_zone))
            raise ConfigError("zones", cfg.zones, f"{what} in more than one zone (all are in {zone})")
