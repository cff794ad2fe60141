"""Resolved cluster facts for the renderer, built the same way by every target."""

from __future__ import annotations

from components.config import ClusterConfig
from components.render import etcd, kubernetes
from components.render.hostfiles import BackupPlan, Cluster
from components.topology import Topology


def cluster_facts(cfg: ClusterConfig, topology: Topology, addresses: dict[str, str],
                  api_host: str, backup_dest: str, backup_ssh_key: str | None = None) -> Cluster:
    """Resolved, provider-neutral facts for the renderer; targets call it inside an apply."""
    members = tuple(etcd.Member(m.name, addresses[m.name]) for m in topology.etcd_members)
    spares = tuple(etcd.Member(m.name, addresses[m.name]) for m in topology.spares)
    # The delta log goes where the snapshots go (docs/backups.md); its archiver compacts etcd, held behind what is
    # archived, and kube-apiserver does not.
    delta_seconds = cfg.backup.delta_seconds if backup_dest.startswith(("ssh://", "gs://", "s3://")) else 0
    api = kubernetes.ApiServerSettings(
        kubernetes_version=cfg.kubernetes_version,
        etcd_servers=tuple(m.client_url for m in members),
        service_cidr=cfg.network.service_cidr,
        pod_cidr=cfg.network.pod_cidr,
        cluster_domain=cfg.network.cluster_domain,
        api_endpoint=f"https://{api_host}:{kubernetes.API_PORT}",
        etcd_compaction=not delta_seconds,
    )
    settings = etcd.EtcdSettings(cfg.cluster_name, cfg.etcd.heartbeat_ms, cfg.etcd.election_ms,
                                 cluster_token=f"{cfg.cluster_name}-etcd")
    plan = BackupPlan(backup_dest, cfg.backup.interval_minutes, cfg.backup.verify, backup_ssh_key, delta_seconds)
    return Cluster(cfg.cluster_name, settings, members, spares, api, plan)
