"""Policy: every bad stack config is refused with one message naming key, value and what is allowed.

Each case changes one thing in a valid stack and expects the ConfigError for that key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components.config import ConfigError
from components.validation import load
from tests.program import ROOT, stack_config

LOCAL = stack_config(ROOT / "stacks" / "Pulumi.local.yaml")
GCE = stack_config(ROOT / "stacks" / "Pulumi.gce-example.yaml")
AWS = stack_config(ROOT / "stacks" / "Pulumi.aws-example.yaml")

Edit = Callable[[dict[str, Any]], None]


def _generated_private_key() -> str:
    """A throwaway key made at run time: no key material lives in the repository."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


def _set(path: str, value: Any) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _delete(path: str) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        del node[last]
    return edit


def _host(index: int, **changes: Any) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"][index].update(changes)
    return edit


def _roles(*roles_per_host: list[str]) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        for host, roles in zip(cfg["baremetal"]["hosts"], roles_per_host, strict=True):
            host["roles"] = roles
    return edit


def _both(*edits: Edit) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        for e in edits:
            e(cfg)
    return edit


BAD: list[tuple[str, dict[str, Any], Edit, str]] = [
    # (case id, base stack, edit, key named in the error)
    ("unknown-target", LOCAL, _set("target", "azure"), "target"),
    ("cluster-name-uppercase", LOCAL, _set("clusterName", "Prod"), "clusterName"),
    ("cluster-name-too-long", LOCAL, _set("clusterName", "a" * 21), "clusterName"),
    ("cluster-name-leading-digit", LOCAL, _set("clusterName", "1prod"), "clusterName"),
    ("cluster-name-missing", LOCAL, _delete("clusterName"), "clusterName"),
    ("kubernetes-version-unpinned", LOCAL, _set("kubernetesVersion", "1.29.0"), "kubernetesVersion"),
    ("resilience-unknown", LOCAL, _set("resilience", "maximal"), "resilience"),
    ("etcd-members-even", GCE, _set("etcd.members", 4), "etcd.members"),
    ("etcd-members-one-default", GCE, _set("etcd.members", 1), "etcd.members"),
    ("etcd-members-seven", GCE, _set("etcd.members", 7), "etcd.members"),
    ("api-servers-one-default", GCE, _set("apiServers.count", 1), "apiServers.count"),
    ("api-servers-zero", GCE, _set("apiServers.count", 0), "apiServers.count"),
    ("etcd-placement-unknown", GCE, _set("etcd.placement", "shared"), "etcd.placement"),
    ("etcd-disk-unknown", GCE, _set("etcd.disk", "nfs"), "etcd.disk"),
    ("etcd-version-unpinned", GCE, _set("etcd.version", "3.5.0"), "etcd.version"),
    ("etcd-distro-on-cloud", GCE, _both(_set("etcd.source", "distro"), _set("etcd.version", "3.4.23")), "etcd.source"),
    ("election-below-5x-heartbeat", GCE, _both(_set("etcd.heartbeatMs", 300), _set("etcd.electionMs", 1000)),
     "etcd.electionMs"),
    ("election-above-50s", GCE, _set("etcd.electionMs", 60_000), "etcd.electionMs"),
    ("heartbeat-too-small", GCE, _set("etcd.heartbeatMs", 1), "etcd.heartbeatMs"),
    ("colocated-count-mismatch", GCE, _both(_set("etcd.placement", "colocated"), _set("apiServers.count", 2)),
     "apiServers.count"),
    ("backup-interval-too-short", GCE, _set("backup.intervalMinutes", 1), "backup.intervalMinutes"),
    ("backup-retain-negative", GCE, _set("backup.retain", {"recent": 0, "daily": 7}), "backup.retain.recent"),
    ("backup-verify-not-bool", GCE, _set("backup.verify", "sometimes"), "backup.verify"),
    ("unknown-top-level-key", GCE, _set("etcdMembers", 3), "etcdMembers"),
    ("unknown-nested-key", GCE, _set("etcd.member", 3), "etcd.member"),
    ("pod-cidr-invalid", GCE, _set("network.podCidr", "10.244.0.0/33"), "network.podCidr"),
    ("pod-cidr-host-bits", GCE, _set("network.podCidr", "10.244.0.1/16"), "network.podCidr"),
    ("service-cidr-too-large", GCE, _set("network.serviceCidr", "10.0.0.0/8"), "network.serviceCidr"),
    ("cidrs-overlap", GCE, _set("network.serviceCidr", "10.244.16.0/20"), "network.serviceCidr"),
    ("admin-cidr-invalid", GCE, _set("network.adminCidrs", ["everyone"]), "network.adminCidrs[0]"),
    ("gce-zone-malformed", GCE, _set("zones", ["europe-west1", "europe-west1-c", "europe-west1-d"]), "zones[0]"),
    ("gce-zone-other-region", GCE, _set("zones", ["europe-west1-b", "europe-west1-c", "us-east1-b"]), "zones[2]"),
    ("zones-repeated", GCE, _set("zones", ["europe-west1-b", "europe-west1-b", "europe-west1-c"]), "zones"),
    ("zones-empty", GCE, _set("zones", []), "zones"),
    ("five-members-over-two-zones", GCE,
     _both(_set("etcd.members", 5), _set("zones", ["europe-west1-b", "europe-west1-c"])), "zones"),
    ("three-members-over-two-zones", AWS, _set("zones", ["eu-west-1a", "eu-west-1b"]), "zones"),
    ("aws-zone-malformed", AWS, _set("zones", ["eu-west-1", "eu-west-1b", "eu-west-1c"]), "zones[0]"),
    ("aws-section-missing", AWS, _delete("aws"), "aws"),
    ("second-target-section", AWS, _set("gce", {"project": "p", "region": "europe-west1"}), "gce"),
    ("gce-network-without-subnetwork", GCE, _set("gce.network", "shared-vpc"), "gce.subnetwork"),
    ("gce-subnet-cidr-invalid", GCE, _set("gce.subnetCidr", "10.10.0.0/33"), "gce.subnetCidr"),
    ("aws-vpc-cidr-invalid", AWS, _set("aws.vpcCidr", "10.20.0.1/16"), "aws.vpcCidr"),
    ("aws-vpc-cidr-too-small", AWS, _set("aws.vpcCidr", "10.20.0.0/26"), "aws.vpcCidr"),
    ("aws-subnets-with-public-api", AWS, _set("aws.subnetIds", ["subnet-0123456789abcdef0"] * 3), "aws.publicApi"),
    ("aws-subnets-not-one-per-zone", AWS, _both(_set("aws.publicApi", False),
                                                _set("aws.subnetIds", ["subnet-0123456789abcdef0"])), "aws.subnetIds"),
    ("aws-subnet-id-malformed", AWS, _both(_set("aws.publicApi", False), _set(
        "aws.subnetIds", ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1", "sn-1"])), "aws.subnetIds[2]"),
    ("baremetal-persistent-disk", LOCAL, _set("etcd.disk", "persistent"), "etcd.disk"),
    ("baremetal-zone-label-invalid", LOCAL, _set("zones", ["Rack A", "rack-b", "rack-c"]), "zones[0]"),
    ("baremetal-duplicate-name", LOCAL, _host(1, name="h1"), "baremetal.hosts.name[1]"),
    ("baremetal-duplicate-address", LOCAL, _host(2, address="10.250.0.11"), "baremetal.hosts.address[2]"),
    ("baremetal-address-invalid", LOCAL, _host(0, address="10.250.0.300"), "baremetal.hosts[0].address"),
    ("baremetal-host-zone-unknown", LOCAL, _host(0, zone="rack-z"), "baremetal.hosts[0].zone"),
    ("baremetal-role-unknown", LOCAL, _host(0, roles=["etcd", "apiserver", "database"]), "baremetal.hosts[0].roles[2]"),
    ("baremetal-too-few-etcd-hosts", LOCAL, _host(2, roles=["apiserver", "loadbalancer"]), "baremetal.hosts"),
    ("baremetal-one-loadbalancer", LOCAL,
     _roles(["etcd", "apiserver", "loadbalancer"], ["etcd", "apiserver"], ["etcd", "apiserver"]), "baremetal.hosts"),
    ("baremetal-vip-is-host", LOCAL, _set("baremetal.apiVip", "10.250.0.12"), "baremetal.apiVip"),
    ("baremetal-vip-invalid", LOCAL, _set("baremetal.apiVip", "vip.example"), "baremetal.apiVip"),
    ("baremetal-backup-on-member", LOCAL, _set("baremetal.backupHost", {"address": "10.250.0.11"}),
     "baremetal.backupHost.address"),
    ("baremetal-backup-path-relative", LOCAL, _set("baremetal.backupHost.path", "backups"),
     "baremetal.backupHost.path"),
    ("baremetal-no-ssh-key", LOCAL, _delete("baremetal.sshPrivateKeyPath"), "baremetal.sshPrivateKey"),
    ("baremetal-two-ssh-keys", LOCAL, _set("baremetal.sshPrivateKey", "key-material-placeholder"),
     "baremetal.sshPrivateKey"),
    ("baremetal-spare-clashes", LOCAL,
     _set("baremetal.spares", [{"name": "h2", "address": "10.250.0.15", "zone": "rack-a"}]), "baremetal.hosts.name[3]"),
    ("baremetal-colocated-mismatch", LOCAL, _host(0, roles=["etcd", "loadbalancer"]), "baremetal.hosts"),
    ("baremetal-takeover-too-fast", LOCAL, _set("baremetal.spareTakeoverAfterSeconds", 5),
     "baremetal.spareTakeoverAfterSeconds"),
]


@pytest.mark.parametrize(("base", "edit", "key"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_refused_with_one_message_naming_key_value_and_allowed(
        base: dict[str, Any], edit: Edit, key: str) -> None:
    cfg = copy.deepcopy(base)
    edit(cfg)
    with pytest.raises(ConfigError) as caught:
        load(cfg)
    error = caught.value
    assert error.key == key, f"expected the error to name {key}, got {error.key}: {error}"
    message = str(error)
    assert message.count("config key") == 1 and "\n" not in message
    assert f"'{key}'" in message and "allowed:" in message and error.allowed


def test_there_are_at_least_thirty_bad_config_cases() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("stack", sorted((ROOT / "stacks").glob("Pulumi.*.yaml")), ids=lambda p: p.name)
def test_every_shipped_stack_is_valid(stack: Path) -> None:
    cfg = load(stack_config(stack))
    assert cfg.cluster_name


def test_zone_error_says_which_zone_holds_a_quorum() -> None:
    cfg = copy.deepcopy(GCE)
    cfg["etcd"]["members"] = 5
    cfg["zones"] = ["europe-west1-b", "europe-west1-c"]
    with pytest.raises(ConfigError, match="zone europe-west1-b would hold 3 of 5"):
        load(cfg)


def test_load_balancers_must_not_share_one_zone() -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"]["hosts"] = [
        {"name": "h1", "address": "10.250.0.11", "zone": "rack-a", "roles": ["etcd", "apiserver", "loadbalancer"]},
        {"name": "h2", "address": "10.250.0.12", "zone": "rack-b", "roles": ["etcd", "apiserver"]},
        {"name": "h3", "address": "10.250.0.13", "zone": "rack-c", "roles": ["etcd", "apiserver"]},
        {"name": "lb2", "address": "10.250.0.15", "zone": "rack-a", "roles": ["loadbalancer"]},
    ]
    with pytest.raises(ConfigError, match=r"load balancers \(API VIP holders\) .* \(all are in rack-a\)"):
        load(cfg)


def test_minimal_allows_one_member_and_one_api_server() -> None:
    cfg = copy.deepcopy(GCE)
    cfg.update(resilience="minimal", zones=["europe-west1-b"])
    cfg["etcd"]["members"] = 1
    cfg["apiServers"]["count"] = 1
    assert load(cfg).etcd.members == 1


def test_ssh_private_key_is_kept_as_a_secret_string() -> None:
    cfg = copy.deepcopy(LOCAL)
    del cfg["baremetal"]["sshPrivateKeyPath"]
    key = _generated_private_key()
    cfg["baremetal"]["sshPrivateKey"] = key
    model = load(cfg)
    assert model.baremetal is not None and key not in repr(model.baremetal)
    assert "PRIVATE KEY" not in repr(model)


def test_pulumi_yaml_declares_every_config_key_with_a_description() -> None:
    import yaml

    from components.config import TOP_LEVEL_KEYS
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    declared = project["config"]
    assert project["name"] == "resilient-control-plane" and project["stackConfigDir"] == "stacks"
    assert set(declared) == set(TOP_LEVEL_KEYS), set(declared) ^ set(TOP_LEVEL_KEYS)
    for key, declaration in declared.items():
        assert declaration.get("description"), f"Pulumi.yaml config key {key} has no description"
