"""The ControlPlane component: config in, a running control plane on one target out."""

from __future__ import annotations

import pulumi
import pulumi_random as random
import pulumi_tls as tls

from components.config import ClusterConfig
from components.pki import ClusterPki
from components.render import kubernetes
from components.render.hostfiles import Credentials
from components.report import resilience_report
from components.summary import resilience_summary
from components.targets import SharedAssets, target_for
from components.topology import plan


def _credentials(pki: ClusterPki, encryption_key: random.RandomBytes) -> pulumi.Output[Credentials]:
    names = list(pki.certs)
    cas = list(pki.ca_cert_pem)
    parts = [pki.ca_cert_pem[c] for c in cas]
    parts += [pki.certs[n].cert_pem for n in names] + [pki.certs[n].key_pem for n in names]
    parts += [pki.ca_key_pem("kubernetes-ca"), pki.service_account_key_pem,
              pki.service_account_public_pem, encryption_key.base64]

    def build(values: list[str]) -> Credentials:
        n, k = len(cas), len(names)
        ca_certs = dict(zip(cas, values[:n], strict=True))
        certs = {name: (values[n + i], values[n + k + i]) for i, name in enumerate(names)}
        ca_key, sa_key, sa_pub, enc = values[n + 2 * k:]
        return Credentials(ca_certs, certs, ca_key, sa_key, sa_pub, enc)

    return pulumi.Output.secret(pulumi.Output.all(*parts).apply(build))


class ControlPlane(pulumi.ComponentResource):
    """PKI, host assets and the chosen target's machines, load balancers and backups."""

    def __init__(self, name: str, cfg: ClusterConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kcp:index:ControlPlane", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        topology = plan(cfg)
        target = target_for(cfg)(name, cfg, topology, self)
        endpoints = target.endpoints()
        self.pki = ClusterPki(f"{name}-pki", cfg, topology, endpoints, opts=child)
        encryption_key = random.RandomBytes(f"{name}-secrets-encryption-key", length=32, opts=child)
        backup_key = tls.PrivateKey(f"{name}-backup-ssh-key", algorithm="ED25519", opts=child)
        deployed = target.deploy(SharedAssets(
            credentials=_credentials(self.pki, encryption_key),
            backup_public_key_openssh=backup_key.public_key_openssh,
            backup_private_key_openssh=pulumi.Output.secret(backup_key.private_key_openssh),
        ))
        self.api_endpoint = deployed.api_endpoint
        self.etcd_client_endpoints = deployed.etcd_client_endpoints
        self.backup_location = deployed.backup_location
        self.admin_kubeconfig = pulumi.Output.secret(pulumi.Output.all(
            deployed.api_endpoint, self.pki.ca_cert_pem["kubernetes-ca"],
            self.pki.certs["admin"].cert_pem, self.pki.certs["admin"].key_pem,
        ).apply(lambda v: kubernetes.kubeconfig(cfg.cluster_name, v[0], "kubernetes-admin", v[1], v[2], v[3])))
        self.summary = resilience_summary(cfg, topology)
        self.report = resilience_report(cfg)
        self.register_outputs({
            "apiEndpoint": self.api_endpoint,
            "etcdClientEndpoints": self.etcd_client_endpoints,
            "backupLocation": self.backup_location,
            "adminKubeconfig": self.admin_kubeconfig,
            "resilienceSummary": self.summary,
            "resilienceReport": self.report,
        })
