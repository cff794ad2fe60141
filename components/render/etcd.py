"""etcd member configuration: the environment etcd reads and the one host programs read.

Flags are expressed as etcd's own `ETCD_*` variables so that one file serves etcd
(via `EnvironmentFile=`) and stays readable. The layout is docs/host-layout.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from components.render.templating import render
from kcp_host.contract import AGENT, DATA_DIR, ETCD_ENV, PKI, ClusterEnv, render_env

CLIENT_PORT, PEER_PORT, METRICS_PORT = 2379, 2380, 2381


@dataclass(frozen=True)
class Member:
    name: str
    address: str

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"


@dataclass(frozen=True)
class EtcdSettings:
    cluster_name: str
    heartbeat_ms: int
    election_ms: int
    cluster_token: str  # changes only when a restore creates a new logical cluster


def initial_cluster(members: Sequence[Member]) -> str:
    return ",".join(f"{m.name}={m.peer_url}" for m in members)


def client_endpoints(members: Sequence[Member]) -> str:
    return ",".join(m.client_url for m in members)


def _env_file(values: dict[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


def etcd_env(settings: EtcdSettings, me: Member, members: Sequence[Member]) -> str:
    """etcd's flags for one member: mutual TLS on both ports, no auto-TLS, pre-vote, tuned timeouts.

    Metrics and /health are served on a separate plain-HTTP port so load balancers can
    health-check without a client certificate; it exposes no keys.
    """
    return "# Rendered by resilient-control-plane; etcd reads ETCD_* from here.\n" + _env_file({
        "ETCD_NAME": me.name,
        "ETCD_DATA_DIR": DATA_DIR,
        "ETCD_LISTEN_CLIENT_URLS": f"https://{me.address}:{CLIENT_PORT},https://127.0.0.1:{CLIENT_PORT}",
        "ETCD_ADVERTISE_CLIENT_URLS": me.client_url,
        "ETCD_LISTEN_PEER_URLS": me.peer_url,
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": me.peer_url,
        "ETCD_LISTEN_METRICS_URLS": f"http://{me.address}:{METRICS_PORT},http://127.0.0.1:{METRICS_PORT}",
        "ETCD_INITIAL_CLUSTER": initial_cluster(members),
        "ETCD_INITIAL_CLUSTER_STATE": "new",
        "ETCD_INITIAL_CLUSTER_TOKEN": settings.cluster_token,
        "ETCD_CLIENT_CERT_AUTH": "true",
        "ETCD_TRUSTED_CA_FILE": f"{PKI}/ca.crt",
        "ETCD_CERT_FILE": f"{PKI}/server.crt",
        "ETCD_KEY_FILE": f"{PKI}/server.key",
        "ETCD_PEER_CLIENT_CERT_AUTH": "true",
        "ETCD_PEER_TRUSTED_CA_FILE": f"{PKI}/ca.crt",
        "ETCD_PEER_CERT_FILE": f"{PKI}/peer.crt",
        "ETCD_PEER_KEY_FILE": f"{PKI}/peer.key",
        "ETCD_AUTO_TLS": "false",
        "ETCD_PEER_AUTO_TLS": "false",
        "ETCD_CIPHER_SUITES": ",".join(STRONG_CIPHER_SUITES),
        "ETCD_PRE_VOTE": "true",
        "ETCD_HEARTBEAT_INTERVAL": str(settings.heartbeat_ms),
        "ETCD_ELECTION_TIMEOUT": str(settings.election_ms),
        "ETCD_SNAPSHOT_COUNT": "10000",
        "ETCD_AUTO_COMPACTION_MODE": "periodic",
        "ETCD_AUTO_COMPACTION_RETENTION": "8h",
        "ETCD_QUOTA_BACKEND_BYTES": str(8 * 1024**3),
        "ETCD_STRICT_RECONFIG_CHECK": "true",
        "ETCD_LOGGER": "zap",
    })


def cluster_env(settings: EtcdSettings, me: Member, members: Sequence[Member]) -> str:
    """/etc/etcd/cluster.env: what the host agent knows of this member's cluster (kcp_host.contract)."""
    return render_env(ClusterEnv(
        cluster_name=settings.cluster_name,
        member_name=me.name,
        peer_url=me.peer_url,
        client_url=me.client_url,
        members=tuple(f"{m.name}={m.peer_url}" for m in members),
        client_endpoints=tuple(m.client_url for m in members),
        etcd_ca=f"{PKI}/ca.crt",
        etcd_cert=f"{PKI}/server.crt",
        etcd_key=f"{PKI}/server.key",
        data_dir=DATA_DIR,
    ), "Rendered by resilient-control-plane; read by /usr/local/lib/kcp/kcp-host (kcp_host/contract.py).")


def etcd_unit(cluster_name: str) -> str:
    return render("etcd.service.j2", cluster_name=cluster_name, agent=AGENT, join_env=ClusterEnv.join_env,
                  etcd_env=ETCD_ENV, not_a_member=f"{ClusterEnv.state_dir}/not-a-member")


# Go's TLS 1.2 AEAD suites with forward secrecy (CIS 1.2.x / 2.x ask for strong suites only).
STRONG_CIPHER_SUITES: tuple[str, ...] = (
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
)
