"""Every file a control-plane host needs, per role, and one deterministic bundle format.

Targets never assemble host files themselves: they ask for the files of a role here and
ship the bundle (stdin over SSH on bare metal, a secret fetched at boot on clouds). The
bundle is a gzip'd tar with fixed timestamps, base64-encoded, so the same inputs give
the same bytes and a re-run of `pulumi up` sees no change.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from components.render import backup, etcd, firewall, kubernetes, loadbalancer, maintenance, monitoring, recovery
from components.render.etcd import Member
from components.render.firewall import FirewallPeers, nftables_config
from kcp_host.contract import ETCD_ENV, ClusterEnv


@dataclass(frozen=True)
class HostFile:
    path: str
    content: str | bytes
    mode: int = 0o644
    owner: str = "root"


@dataclass(frozen=True)
class BackupPlan:
    """Where and how often members snapshot; `dest` is ssh://, gs:// or s3:// by target."""

    dest: str
    interval_minutes: int
    verify: bool
    ssh_key_path: str | None = None
    delta_seconds: int = 0  # the delta log's chunk interval; 0: none


@dataclass(frozen=True)
class Cluster:
    """Resolved facts shared by every host of one cluster (plain strings, no Outputs)."""

    name: str
    etcd: etcd.EtcdSettings
    members: tuple[Member, ...]
    spares: tuple[Member, ...]
    api: kubernetes.ApiServerSettings
    backup: BackupPlan


@dataclass(frozen=True)
class Credentials:
    """Resolved PEM texts; private keys stay inside bundles that targets ship as secrets."""

    ca_certs: dict[str, str]  # "etcd-ca" | "kubernetes-ca" | "front-proxy-ca" -> PEM
    certs: dict[str, tuple[str, str]]  # certificate_table name -> (cert PEM, key PEM)
    kubernetes_ca_key: str
    service_account_key: str
    service_account_public: str
    encryption_key_b64: str


def etcd_member_files(cluster: Cluster, me: Member, creds: Credentials) -> list[HostFile]:
    """Config, TLS material, backup, maintenance, metrics and self-healing units of one etcd member (or a spare)."""
    server_cert, server_key = creds.certs[f"etcd-server-{me.name}"]
    peer_cert, peer_key = creds.certs[f"etcd-peer-{me.name}"]
    backup_cert, backup_key = creds.certs["etcd-backup-client"]
    pki = etcd.PKI
    return [
        HostFile(ETCD_ENV, etcd.etcd_env(cluster.etcd, me, cluster.members)),
        HostFile(ClusterEnv.PATH, etcd.cluster_env(cluster.etcd, me, cluster.members)),
        HostFile("/etc/systemd/system/etcd.service", etcd.etcd_unit(cluster.name)),
        HostFile(f"{pki}/ca.crt", creds.ca_certs["etcd-ca"]),
        HostFile(f"{pki}/server.crt", server_cert, 0o600, "etcd"),
        HostFile(f"{pki}/server.key", server_key, 0o600, "etcd"),
        HostFile(f"{pki}/peer.crt", peer_cert, 0o600, "etcd"),
        HostFile(f"{pki}/peer.key", peer_key, 0o600, "etcd"),
        HostFile(f"{pki}/backup-client.crt", backup_cert, 0o600),
        HostFile(f"{pki}/backup-client.key", backup_key, 0o600),
        *text_files(recovery.member_recovery_files()),
        *text_files(_backup_files(cluster)),
        *text_files(maintenance.maintenance_files()),
        *text_files(monitoring.monitoring_files(cluster.backup.interval_minutes)),
    ]


def _backup_files(cluster: Cluster) -> dict[str, str]:
    plan = cluster.backup
    return backup.backup_host_files(cluster.name, plan.dest, plan.interval_minutes, plan.verify, plan.ssh_key_path,
                                    plan.delta_seconds)


def text_files(files: dict[str, str]) -> list[HostFile]:
    return [HostFile(path, content) for path, content in files.items()]


def _kubeconfig(cluster: Cluster, creds: Credentials, cert_name: str, user: str) -> str:
    cert, key = creds.certs[cert_name]
    return kubernetes.kubeconfig(cluster.name, cluster.api.api_endpoint, user,
                                 creds.ca_certs["kubernetes-ca"], cert, key)


def apiserver_files(cluster: Cluster, creds: Credentials) -> list[HostFile]:
    """Static pods, their certificates, kubeconfigs, API server side configuration, and the kubelet that runs them."""
    k8s, pki = kubernetes.K8S, kubernetes.PKI
    files = [
        HostFile(f"{k8s}/manifests/kube-apiserver.yaml", kubernetes.apiserver_manifest(cluster.api), 0o600),
        HostFile(f"{k8s}/manifests/kube-controller-manager.yaml",
                 kubernetes.controller_manager_manifest(cluster.api), 0o600),
        HostFile(f"{k8s}/manifests/kube-scheduler.yaml", kubernetes.scheduler_manifest(cluster.api), 0o600),
        HostFile(f"{k8s}/auth/authentication-config.yaml", kubernetes.authentication_config()),
        HostFile(f"{k8s}/audit/audit-policy.yaml", kubernetes.audit_policy()),
        HostFile(f"{k8s}/encryption/encryption-config.yaml",
                 kubernetes.encryption_config(creds.encryption_key_b64), 0o600),
        HostFile(f"{k8s}/controller-manager.conf",
                 _kubeconfig(cluster, creds, "controller-manager", "system:kube-controller-manager"), 0o600),
        HostFile(f"{k8s}/scheduler.conf", _kubeconfig(cluster, creds, "scheduler", "system:kube-scheduler"), 0o600),
        HostFile(f"{pki}/ca.crt", creds.ca_certs["kubernetes-ca"]),
        HostFile(f"{pki}/ca.key", creds.kubernetes_ca_key, 0o600),
        HostFile(f"{pki}/front-proxy-ca.crt", creds.ca_certs["front-proxy-ca"]),
        HostFile(f"{pki}/etcd/ca.crt", creds.ca_certs["etcd-ca"]),
        HostFile(f"{pki}/sa.key", creds.service_account_key, 0o600),
        HostFile(f"{pki}/sa.pub", creds.service_account_public),
        # The kubelet and its runtime; `kcp-host kubelet-install` adds the pinned binaries and starts them.
        HostFile(kubernetes.KUBELET_CONFIG, kubernetes.kubelet_config()),
        HostFile("/etc/systemd/system/kubelet.service", kubernetes.kubelet_unit()),
        HostFile("/etc/containerd/config.toml", kubernetes.containerd_config()),
        HostFile("/etc/systemd/system/containerd.service", kubernetes.containerd_unit()),
    ]
    for name in ("apiserver", "apiserver-kubelet-client", "apiserver-etcd-client", "front-proxy-client"):
        cert, key = creds.certs[name]
        files += [HostFile(f"{pki}/{name}.crt", cert), HostFile(f"{pki}/{name}.key", key, 0o600)]
    return files


def admin_kubeconfig(cluster: Cluster, creds: Credentials) -> str:
    return _kubeconfig(cluster, creds, "admin", "kubernetes-admin")


def loadbalancer_files(cluster: Cluster, me: Member, vip: str, interface: str,
                       api_servers: Sequence[Member], load_balancers: Sequence[Member]) -> list[HostFile]:
    return [
        HostFile("/etc/haproxy/haproxy.cfg",
                 loadbalancer.haproxy_config(vip, api_servers, cluster.members, cluster.spares)),
        HostFile("/etc/keepalived/keepalived.conf",
                 loadbalancer.keepalived_config(cluster.name, vip, interface, me, load_balancers), 0o600),
    ]


def firewall_files(peers: FirewallPeers) -> list[HostFile]:
    """The rules arrive beside the live ones; `kcp-host firewall-apply` loads them once it is safe."""
    return [HostFile(firewall.NEW_RULES, nftables_config(peers), 0o600),
            HostFile(firewall.UNIT, firewall.firewall_unit())]


def bundle(files: Sequence[HostFile]) -> str:
    """A reproducible base64 tar.gz of the files with modes and owners, for `tar -x` on the host."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(files, key=lambda f: f.path):
            data = f.content.encode() if isinstance(f.content, str) else f.content
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), f.mode, 0
            info.uname = info.gname = f.owner
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(gzip.compress(raw.getvalue(), mtime=0)).decode()


# Unpacks a bundle read from stdin; ownership by name, so the service users must exist first.
UNPACK_BUNDLE = "base64 -d | tar -xzp --same-owner --no-overwrite-dir -C /"
