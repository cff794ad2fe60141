"""The cluster's PKI, declared with pulumi-tls from one table.

Three CAs keep trust domains apart (a front-proxy or etcd certificate can never act as
a Kubernetes client). `certificate_table` is the whole list of leaf certificates with
their subjects, SANs and usages; `ClusterPki` turns each row into a key, a request and a
signed certificate. Every private key leaves this module wrapped as a Pulumi secret.
Leaf keys and certificates carry `replacement_trigger=pki.rotation`, so bumping that
value re-issues every leaf while the CAs stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components.config import ClusterConfig
from components.topology import Topology

CAS = {
    "etcd-ca": "etcd-ca",
    "kubernetes-ca": "kubernetes",
    "front-proxy-ca": "front-proxy-ca",
}
SERVER, CLIENT = "server_auth", "client_auth"


@dataclass(frozen=True)
class Endpoints:
    """Addresses the certificates must name; Outputs on clouds where they are allocated."""

    api_host: pulumi.Input[str]  # VIP, load balancer IP or DNS name clients use
    etcd_lb_host: pulumi.Input[str]
    member_addresses: dict[str, pulumi.Input[str]]  # machine name -> address
    hosts_are_ips: bool = True  # False where load balancers are reached by DNS name (AWS)

    def san(self, host: pulumi.Input[str]) -> tuple[tuple[pulumi.Input[str], ...], tuple[pulumi.Input[str], ...]]:
        """(dns_names, ip_addresses) for one load-balancer host, by how it is addressed."""
        return ((), (host,)) if self.hosts_are_ips else ((host,), ())


@dataclass(frozen=True)
class CertSpec:
    name: str
    ca: str
    common_name: str
    usages: tuple[str, ...]
    organization: str | None = None
    dns_names: tuple[pulumi.Input[str], ...] = ()
    ip_addresses: tuple[pulumi.Input[str], ...] = ()


def _api_server_cert(cfg: ClusterConfig, topology: Topology, ep: Endpoints) -> CertSpec:
    domain = cfg.network.cluster_domain
    api_ips = [ep.member_addresses[m.name] for m in topology.api_servers if m.name in ep.member_addresses]
    lb_dns, lb_ips = ep.san(ep.api_host)
    return CertSpec(
        "apiserver", "kubernetes-ca", "kube-apiserver", (SERVER,),
        dns_names=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   f"kubernetes.default.svc.{domain}", "localhost", *lb_dns),
        ip_addresses=(cfg.network.first_service_ip, "127.0.0.1", *api_ips, *lb_ips),
    )


def certificate_table(cfg: ClusterConfig, topology: Topology, ep: Endpoints) -> list[CertSpec]:
    """Every leaf certificate of the cluster, in one place, for review and for tests."""
    specs: list[CertSpec] = []
    lb_dns, lb_ips = ep.san(ep.etcd_lb_host)
    for member in (*topology.etcd_members, *topology.spares):
        address = ep.member_addresses[member.name]
        names = (member.name, "localhost")
        specs.append(CertSpec(f"etcd-server-{member.name}", "etcd-ca", member.name, (SERVER, CLIENT),
                              dns_names=(*names, *lb_dns), ip_addresses=(address, "127.0.0.1", *lb_ips)))
        specs.append(CertSpec(f"etcd-peer-{member.name}", "etcd-ca", member.name, (SERVER, CLIENT),
                              dns_names=names, ip_addresses=(address, "127.0.0.1")))
    specs += [
        CertSpec("apiserver-etcd-client", "etcd-ca", "kube-apiserver-etcd-client", (CLIENT,)),
        CertSpec("etcd-backup-client", "etcd-ca", "etcd-backup", (CLIENT,)),
        _api_server_cert(cfg, topology, ep),
        CertSpec("apiserver-kubelet-client", "kubernetes-ca", "kube-apiserver-kubelet-client",
                 (CLIENT,), organization="kubeadm:cluster-admins"),
        CertSpec("front-proxy-client", "front-proxy-ca", "front-proxy-client", (CLIENT,)),
        CertSpec("controller-manager", "kubernetes-ca", "system:kube-controller-manager", (CLIENT,)),
        CertSpec("scheduler", "kubernetes-ca", "system:kube-scheduler", (CLIENT,)),
        CertSpec("admin", "kubernetes-ca", "kubernetes-admin", (CLIENT,), organization="system:masters"),
    ]
    return specs


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: pulumi.Output[str]
    key_pem: pulumi.Output[str]  # always a secret
    spec: CertSpec


class ClusterPki(pulumi.ComponentResource):
    """CAs, the service-account key and every leaf certificate of one cluster."""

    def __init__(self, name: str, cfg: ClusterConfig, topology: Topology, endpoints: Endpoints,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kcp:index:ClusterPki", name, None, opts)
        self._name, self._cfg = name, cfg
        self.ca_cert_pem: dict[str, pulumi.Output[str]] = {}
        self._ca_key_pem: dict[str, pulumi.Output[str]] = {}
        for ca, common_name in CAS.items():
            self._declare_ca(ca, common_name)
        sa_key = tls.PrivateKey(f"{name}-service-account-key", algorithm="RSA", rsa_bits=2048,
                                opts=pulumi.ResourceOptions(parent=self))
        self.service_account_key_pem = pulumi.Output.secret(sa_key.private_key_pem)
        self.service_account_public_pem = sa_key.public_key_pem
        self.table = certificate_table(cfg, topology, endpoints)
        self.certs: dict[str, IssuedCert] = {spec.name: self._issue(spec) for spec in self.table}
        self.register_outputs({"caCertificates": self.ca_cert_pem})

    def ca_key_pem(self, ca: str) -> pulumi.Output[str]:
        """A CA's key (secret); only the Kubernetes CA's leaves the PKI, for CSR signing."""
        return self._ca_key_pem[ca]

    def _declare_ca(self, ca: str, common_name: str) -> None:
        child = pulumi.ResourceOptions(parent=self)
        key = tls.PrivateKey(f"{self._name}-{ca}-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        cert = tls.SelfSignedCert(
            f"{self._name}-{ca}",
            private_key_pem=key.private_key_pem,
            is_ca_certificate=True,
            validity_period_hours=self._cfg.pki.ca_validity_hours,
            allowed_uses=["cert_signing", "crl_signing", "digital_signature", "key_encipherment"],
            subject=tls.SelfSignedCertSubjectArgs(common_name=common_name,
                                                  organization=self._cfg.cluster_name),
            opts=child,
        )
        self.ca_cert_pem[ca] = cert.cert_pem
        self._ca_key_pem[ca] = pulumi.Output.secret(key.private_key_pem)

    def _issue(self, spec: CertSpec) -> IssuedCert:
        rotation = self._cfg.pki.rotation
        leaf = pulumi.ResourceOptions(parent=self, replacement_trigger=rotation)
        key = tls.PrivateKey(f"{self._name}-{spec.name}-key", algorithm="ECDSA", ecdsa_curve="P256",
                             opts=leaf)
        request = tls.CertRequest(
            f"{self._name}-{spec.name}-csr",
            private_key_pem=key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=spec.common_name,
                                               organization=spec.organization,
                                               organizational_unit=f"rotation-{rotation}"),
            dns_names=list(spec.dns_names),
            ip_addresses=list(spec.ip_addresses),
            opts=leaf,
        )
        cert = tls.LocallySignedCert(
            f"{self._name}-{spec.name}",
            cert_request_pem=request.cert_request_pem,
            ca_cert_pem=self.ca_cert_pem[spec.ca],
            ca_private_key_pem=self._ca_key_pem[spec.ca],
            validity_period_hours=self._cfg.pki.leaf_validity_hours,
            early_renewal_hours=min(720, self._cfg.pki.leaf_validity_hours // 4),
            allowed_uses=["digital_signature", "key_encipherment", *spec.usages],
            opts=leaf,
        )
        return IssuedCert(cert.cert_pem, pulumi.Output.secret(key.private_key_pem), spec)
