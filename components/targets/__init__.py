"""The per-target layer: the same small interface on GCE, AWS and bare metal.

A target reserves the addresses certificates must name (`endpoints`), then declares
machines, load balancers, firewall, storage and backups from the shared assets
(`deploy`). Everything else (config, PKI, host files, etcd logic) lives in the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pulumi

from components.config import ClusterConfig
from components.pki import Endpoints
from components.render.hostfiles import Credentials
from components.topology import Topology


@dataclass(frozen=True)
class SharedAssets:
    """What every target ships to machines; `credentials` is a secret Output."""

    credentials: pulumi.Output[Credentials]
    backup_public_key_openssh: pulumi.Output[str]
    backup_private_key_openssh: pulumi.Output[str]  # secret


@dataclass(frozen=True)
class Deployed:
    api_endpoint: pulumi.Output[str]
    etcd_client_endpoints: pulumi.Output[list[str]]
    backup_location: pulumi.Output[str]


class Target(Protocol):
    def endpoints(self) -> Endpoints: ...

    def deploy(self, assets: SharedAssets) -> Deployed: ...


class TargetFactory(Protocol):
    def __call__(self, name: str, cfg: ClusterConfig, topology: Topology,
                 parent: pulumi.Resource) -> Target: ...


def target_for(cfg: ClusterConfig) -> TargetFactory:
    """Import only the chosen target, so a bare-metal run never loads cloud providers."""
    if cfg.target == "baremetal":
        from components.targets.baremetal import BareMetalTarget
        return BareMetalTarget
    if cfg.target == "gce":
        from components.targets.gce import GceTarget
        return GceTarget
    from components.targets.aws import AwsTarget
    return AwsTarget
