"""Static pod manifests, kubeconfigs, API server side files, and the kubelet and containerd
units and configuration for control-plane hosts.

The kubelet runs these as static pods, so the kubelet restarts a crashed component
(self-hosting, goal 5 of the design). Flags follow the CIS Kubernetes benchmark.
Controller-manager and scheduler reach the API through the load balancer, never a
fixed server, so a replica keeps working when one API server dies.

Health checks: anonymous auth is off for everything except `/livez`, `/readyz` and
`/healthz`, through the structured AuthenticationConfiguration (`--authentication-config`).
Load balancers thus see a real readiness answer (200 or 5xx), not a 401.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from components.render.etcd import STRONG_CIPHER_SUITES

K8S = "/etc/kubernetes"
PKI = f"{K8S}/pki"
API_PORT = 6443
AUDIT_LOG = "/var/log/kubernetes/audit/audit.log"
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")


@dataclass(frozen=True)
class ApiServerSettings:
    kubernetes_version: str
    etcd_servers: Sequence[str]
    service_cidr: str
    pod_cidr: str
    cluster_domain: str
    api_endpoint: str  # https://host:6443 of the load balancer or VIP
    etcd_compaction: bool = True  # False where the delta log's archiver compacts etcd instead (docs/backups.md)


KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
CONTAINERD_SOCKET = "unix:///run/containerd/containerd.sock"


def _image(component: str, version: str) -> str:
    return f"registry.k8s.io/{component}:v{version}"


def _flags(values: dict[str, str]) -> list[str]:
    return [f"--{key}={value}" for key, value in values.items()]


def apiserver_flags(s: ApiServerSettings) -> dict[str, str]:
    return {
        "advertise-address": "$(POD_IP)",
        # The node address only: on bare metal HAProxy serves the VIP on the same port.
        "bind-address": "$(POD_IP)",
        "secure-port": str(API_PORT),
        "allow-privileged": "true",
        "authorization-mode": "Node,RBAC",
        "authentication-config": f"{K8S}/auth/authentication-config.yaml",
        # NamespaceLifecycle and ServiceAccount are on by default; named so that no one turns them off by accident.
        "enable-admission-plugins": "NamespaceLifecycle,ServiceAccount,NodeRestriction",
        "enable-bootstrap-token-auth": "true",
        "client-ca-file": f"{PKI}/ca.crt",
        "tls-cert-file": f"{PKI}/apiserver.crt",
        "tls-private-key-file": f"{PKI}/apiserver.key",
        "tls-min-version": "VersionTLS12",
        "tls-cipher-suites": ",".join(STRONG_CIPHER_SUITES),
        "kubelet-client-certificate": f"{PKI}/apiserver-kubelet-client.crt",
        "kubelet-client-key": f"{PKI}/apiserver-kubelet-client.key",
        "kubelet-certificate-authority": f"{PKI}/ca.crt",
        "kubelet-preferred-address-types": "InternalIP,ExternalIP,Hostname",
        "etcd-servers": ",".join(s.etcd_servers),
        "etcd-cafile": f"{PKI}/etcd/ca.crt",
        "etcd-certfile": f"{PKI}/apiserver-etcd-client.crt",
        "etcd-keyfile": f"{PKI}/apiserver-etcd-client.key",
        "encryption-provider-config": f"{K8S}/encryption/encryption-config.yaml",
        "encryption-provider-config-automatic-reload": "true",
        "service-account-issuer": f"https://kubernetes.default.svc.{s.cluster_domain}",
        "service-account-key-file": f"{PKI}/sa.pub",
        "service-account-signing-key-file": f"{PKI}/sa.key",
        "service-account-lookup": "true",
        "service-cluster-ip-range": s.service_cidr,
        "profiling": "false",
        "audit-policy-file": f"{K8S}/audit/audit-policy.yaml",
        "audit-log-path": AUDIT_LOG,
        "audit-log-maxage": "30",
        "audit-log-maxbackup": "10",
        "audit-log-maxsize": "100",
        "requestheader-client-ca-file": f"{PKI}/front-proxy-ca.crt",
        "requestheader-allowed-names": "front-proxy-client",
        "requestheader-extra-headers-prefix": "X-Remote-Extra-",
        "requestheader-group-headers": "X-Remote-Group",
        "requestheader-username-headers": "X-Remote-User",
        "proxy-client-cert-file": f"{PKI}/front-proxy-client.crt",
        "proxy-client-key-file": f"{PKI}/front-proxy-client.key",
        # 0 turns kube-apiserver's own compaction (every 5 min) off: it would discard revisions not archived yet.
        **({} if s.etcd_compaction else {"etcd-compaction-interval": "0"}),
    }


def controller_manager_flags(s: ApiServerSettings) -> dict[str, str]:
    return {
        "bind-address": "127.0.0.1",
        "leader-elect": "true",
        "profiling": "false",
        "use-service-account-credentials": "true",
        "kubeconfig": f"{K8S}/controller-manager.conf",
        "authentication-kubeconfig": f"{K8S}/controller-manager.conf",
        "authorization-kubeconfig": f"{K8S}/controller-manager.conf",
        "service-account-private-key-file": f"{PKI}/sa.key",
        "root-ca-file": f"{PKI}/ca.crt",
        "cluster-signing-cert-file": f"{PKI}/ca.crt",
        "cluster-signing-key-file": f"{PKI}/ca.key",
        "cluster-cidr": s.pod_cidr,
        "service-cluster-ip-range": s.service_cidr,
        "allocate-node-cidrs": "true",
        "controllers": "*,bootstrapsigner,tokencleaner",
        "terminated-pod-gc-threshold": "12500",
        "tls-min-version": "VersionTLS12",
        "tls-cipher-suites": ",".join(STRONG_CIPHER_SUITES),
    }


def scheduler_flags(_: ApiServerSettings) -> dict[str, str]:
    return {
        "bind-address": "127.0.0.1",
        "leader-elect": "true",
        "profiling": "false",
        "kubeconfig": f"{K8S}/scheduler.conf",
        "authentication-kubeconfig": f"{K8S}/scheduler.conf",
        "authorization-kubeconfig": f"{K8S}/scheduler.conf",
        "tls-min-version": "VersionTLS12",
        "tls-cipher-suites": ",".join(STRONG_CIPHER_SUITES),
    }


def _probe(path: str, port: int, host: str | None) -> dict[str, Any]:
    get: dict[str, Any] = {"path": path, "port": port, "scheme": "HTTPS"}
    if host:
        get["host"] = host
    return {"httpGet": get, "initialDelaySeconds": 10, "periodSeconds": 10,
            "timeoutSeconds": 15, "failureThreshold": 8}


@dataclass(frozen=True)
class Component:
    """One static pod: kubeadm's requests (no limits: a throttled or OOM-killed control plane is worse),
    probes on its own health endpoints, and host paths (files mounted as files)."""

    name: str
    flags: dict[str, str]
    mounts: dict[str, str]  # host path -> "ro" | "rw"
    live: dict[str, Any]
    ready: dict[str, Any]
    cpu: str
    memory: str
    env: tuple[dict[str, Any], ...] = ()


def _static_pod(c: Component, version: str) -> str:
    volumes = [{"name": f"v{i}", "hostPath": {"path": path, "type": "FileOrCreate" if path.endswith(".conf")
                                              else "DirectoryOrCreate"}} for i, path in enumerate(c.mounts)]
    volume_mounts = [{"name": f"v{i}", "mountPath": path, "readOnly": read_only == "ro"}
                     for i, (path, read_only) in enumerate(c.mounts.items())]
    container: dict[str, Any] = {
        "name": c.name, "image": _image(c.name, version),
        "command": [c.name, *_flags(c.flags)],
        "livenessProbe": c.live, "readinessProbe": c.ready, "startupProbe": {**c.live, "failureThreshold": 24},
        "resources": {"requests": {"cpu": c.cpu, "memory": c.memory}},
        "volumeMounts": volume_mounts,
        # Root stays (the keys it reads are root's, 0600, as kubeadm lays them out); nothing else does.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if c.env:
        container["env"] = list(c.env)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": c.name, "namespace": "kube-system",
                     "labels": {"component": c.name, "tier": "control-plane"}},
        "spec": {"hostNetwork": True, "priorityClassName": "system-node-critical",
                 "automountServiceAccountToken": False,
                 "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [container], "volumes": volumes},
    }
    return yaml.safe_dump(pod, sort_keys=False)


def apiserver_manifest(s: ApiServerSettings) -> str:
    env = ({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},)
    mounts = {PKI: "ro", f"{K8S}/auth": "ro", f"{K8S}/encryption": "ro", f"{K8S}/audit": "ro",
              "/var/log/kubernetes/audit": "rw"}
    return _static_pod(Component("kube-apiserver", apiserver_flags(s), mounts, _probe("/livez", API_PORT, None),
                                 _probe("/readyz", API_PORT, None), "250m", "512Mi", env), s.kubernetes_version)


def controller_manager_manifest(s: ApiServerSettings) -> str:
    mounts = {PKI: "ro", f"{K8S}/controller-manager.conf": "ro"}
    probe = _probe("/healthz", 10257, "127.0.0.1")
    return _static_pod(Component("kube-controller-manager", controller_manager_flags(s), mounts, probe, probe,
                                 "200m", "128Mi"), s.kubernetes_version)


def scheduler_manifest(s: ApiServerSettings) -> str:
    mounts = {f"{K8S}/scheduler.conf": "ro"}
    probe = _probe("/healthz", 10259, "127.0.0.1")
    return _static_pod(Component("kube-scheduler", scheduler_flags(s), mounts, probe, probe, "100m", "64Mi"),
                       s.kubernetes_version)


def kubeconfig(cluster_name: str, server: str, user: str, ca_pem: str, cert_pem: str, key_pem: str) -> str:
    """A kubeconfig with embedded credentials; `server` is the load balancer, so clients fail over."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": f"{user}@{cluster_name}", "context": {"cluster": cluster_name, "user": user}}],
        "current-context": f"{user}@{cluster_name}",
    }
    return yaml.safe_dump(config, sort_keys=False)


def authentication_config() -> str:
    """Anonymous requests only for health endpoints: LB checks get real answers, nothing else does."""
    return yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AuthenticationConfiguration",
        "anonymous": {"enabled": True, "conditions": [{"path": p} for p in HEALTH_PATHS]},
    }, sort_keys=False)


def encryption_config(key_b64: str) -> str:
    """Secrets encrypted at rest with secretbox (XSalsa20-Poly1305); identity only to read old data."""
    return yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets"],
                       "providers": [{"secretbox": {"keys": [{"name": "key1", "secret": key_b64}]}},
                                     {"identity": {}}]}],
    }, sort_keys=False)


def audit_policy() -> str:
    """Metadata for everything, no request bodies (they could hold secrets); skip health noise."""
    return yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "None", "nonResourceURLs": [f"{p}*" for p in HEALTH_PATHS]},
            {"level": "Metadata"},
        ],
    }, sort_keys=False)


def kubelet_config() -> str:
    """Standalone: the kubelet (re)starts the static pods without an API server, so a control-plane host heals
    itself after a crash. It serves nothing but loopback, and trusts no anonymous caller."""
    return yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "staticPodPath": f"{K8S}/manifests",
        "cgroupDriver": "systemd",
        "containerRuntimeEndpoint": CONTAINERD_SOCKET,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "readOnlyPort": 0,
        "address": "127.0.0.1",
        "protectKernelDefaults": False,
    }, sort_keys=False)


def kubelet_unit() -> str:
    """The kubelet of `kcp-host kubelet-install`, which installs the binary and enables this unit."""
    return (
        "[Unit]\n"
        "Description=kubelet (standalone: control-plane static pods)\n"
        "After=containerd.service\n"
        "Requires=containerd.service\n"
        "[Service]\n"
        f"ExecStart=/usr/local/bin/kubelet --config={KUBELET_CONFIG}\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def containerd_unit() -> str:
    """containerd from its release archive, which ships no unit for /usr/local/bin."""
    return (
        "[Unit]\n"
        "Description=containerd container runtime\n"
        "After=network.target\n"
        "[Service]\n"
        "ExecStartPre=-/sbin/modprobe overlay\n"
        "ExecStart=/usr/local/bin/containerd\n"
        "Restart=always\n"
        "Delegate=yes\n"
        "KillMode=process\n"
        "LimitNOFILE=infinity\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def containerd_config() -> str:
    """Only what differs from containerd's defaults (it merges this over them): runc under systemd's cgroups, the
    driver the kubelet is told to use. Config version 4 is containerd 2.3's (components/versions.py)."""
    return (
        "version = 4\n"
        "\n"
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n"
        "  SystemdCgroup = true\n"
    )
