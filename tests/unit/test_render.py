"""Policies of the provider-neutral renderer: etcd flags, CIS flags of the static pods,
kubeconfigs through the load balancer, health checks that need no credentials."""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
import tomllib

import pytest
import yaml

from components import versions
from components.render import etcd, kubernetes
from components.render.etcd import STRONG_CIPHER_SUITES, Member
from components.render.hostfiles import BackupPlan, Cluster, Credentials, HostFile, apiserver_files, bundle

MEMBERS = (Member("m0", "10.0.0.10"), Member("m1", "10.0.1.10"), Member("m2", "10.0.2.10"))
SETTINGS = etcd.EtcdSettings("prod", heartbeat_ms=150, election_ms=1500, cluster_token="prod-etcd")
API = kubernetes.ApiServerSettings("1.36.4", tuple(m.client_url for m in MEMBERS), "10.96.0.0/12",
                                   "10.244.0.0/16", "cluster.local", "https://10.0.0.100:6443")


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _command(manifest: str) -> dict[str, str]:
    pod = yaml.safe_load(manifest)
    args = pod["spec"]["containers"][0]["command"][1:]
    return dict(a.removeprefix("--").split("=", 1) for a in args)


def test_etcd_requires_client_certificates_on_both_ports_and_never_self_signs() -> None:
    env = _env(etcd.etcd_env(SETTINGS, MEMBERS[0], MEMBERS))
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true" and env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_AUTO_TLS"] == "false" and env["ETCD_PEER_AUTO_TLS"] == "false"
    assert env["ETCD_TRUSTED_CA_FILE"] == env["ETCD_PEER_TRUSTED_CA_FILE"] == "/etc/etcd/pki/ca.crt"
    assert all(url.startswith("https://") for url in env["ETCD_LISTEN_CLIENT_URLS"].split(","))
    assert env["ETCD_LISTEN_PEER_URLS"].startswith("https://")


def test_etcd_uses_pre_vote_and_the_configured_timeouts() -> None:
    env = _env(etcd.etcd_env(SETTINGS, MEMBERS[1], MEMBERS))
    assert env["ETCD_PRE_VOTE"] == "true"
    assert (env["ETCD_HEARTBEAT_INTERVAL"], env["ETCD_ELECTION_TIMEOUT"]) == ("150", "1500")


def test_etcd_initial_cluster_lists_every_member_and_health_is_on_plain_http_2381() -> None:
    env = _env(etcd.etcd_env(SETTINGS, MEMBERS[2], MEMBERS))
    assert env["ETCD_INITIAL_CLUSTER"] == ("m0=https://10.0.0.10:2380,m1=https://10.0.1.10:2380,"
                                           "m2=https://10.0.2.10:2380")
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    assert env["ETCD_LISTEN_METRICS_URLS"] == "http://10.0.2.10:2381,http://127.0.0.1:2381"


def test_etcd_unit_restarts_always_and_runs_member_recovery_first() -> None:
    unit = etcd.etcd_unit("prod")
    assert "Restart=always" in unit and "ExecStartPre=+/usr/local/lib/kcp/kcp-host etcd-member-recovery" in unit
    assert "EnvironmentFile=-/run/etcd/join.env" in unit


def test_apiserver_authorization_and_admission() -> None:
    flags = _command(kubernetes.apiserver_manifest(API))
    assert flags["authorization-mode"] == "Node,RBAC"
    assert "NodeRestriction" in flags["enable-admission-plugins"].split(",")
    assert flags["profiling"] == "false"
    assert "anonymous-auth" not in flags  # anonymous is governed by the structured authentication config


def test_apiserver_allows_anonymous_only_on_health_endpoints() -> None:
    config = yaml.safe_load(kubernetes.authentication_config())
    assert config["anonymous"]["enabled"] is True
    assert sorted(c["path"] for c in config["anonymous"]["conditions"]) == ["/healthz", "/livez", "/readyz"]
    assert _command(kubernetes.apiserver_manifest(API))["authentication-config"].endswith("authentication-config.yaml")


def test_apiserver_audit_log_with_rotation() -> None:
    flags = _command(kubernetes.apiserver_manifest(API))
    assert flags["audit-log-path"] and flags["audit-policy-file"]
    assert (flags["audit-log-maxage"], flags["audit-log-maxbackup"], flags["audit-log-maxsize"]) == ("30", "10", "100")


def test_apiserver_service_accounts_and_etcd_tls() -> None:
    flags = _command(kubernetes.apiserver_manifest(API))
    assert flags["service-account-lookup"] == "true"
    assert flags["service-account-key-file"] and flags["service-account-signing-key-file"]
    assert {flags["etcd-cafile"], flags["etcd-certfile"], flags["etcd-keyfile"]} == {
        "/etc/kubernetes/pki/etcd/ca.crt", "/etc/kubernetes/pki/apiserver-etcd-client.crt",
        "/etc/kubernetes/pki/apiserver-etcd-client.key"}
    assert flags["etcd-servers"] == "https://10.0.0.10:2379,https://10.0.1.10:2379,https://10.0.2.10:2379"


def test_apiserver_encrypts_secrets_at_rest() -> None:
    flags = _command(kubernetes.apiserver_manifest(API))
    config = yaml.safe_load(kubernetes.encryption_config("a2V5"))
    assert flags["encryption-provider-config"].endswith("encryption-config.yaml")
    providers = config["resources"][0]["providers"]
    assert config["resources"][0]["resources"] == ["secrets"] and "secretbox" in providers[0]


@pytest.mark.parametrize("manifest", [kubernetes.apiserver_manifest, kubernetes.controller_manager_manifest,
                                      kubernetes.scheduler_manifest])
def test_strong_tls_only(manifest) -> None:
    flags = _command(manifest(API))
    assert flags["tls-min-version"] == "VersionTLS12"
    assert set(flags["tls-cipher-suites"].split(",")) <= set(STRONG_CIPHER_SUITES)
    assert all("GCM" in s or "CHACHA20" in s for s in STRONG_CIPHER_SUITES)


@pytest.mark.parametrize("manifest", [kubernetes.controller_manager_manifest, kubernetes.scheduler_manifest])
def test_controller_manager_and_scheduler_bind_loopback_and_elect_a_leader(manifest) -> None:
    flags = _command(manifest(API))
    assert flags["bind-address"] == "127.0.0.1" and flags["leader-elect"] == "true" and flags["profiling"] == "false"


def test_controller_manager_uses_service_account_credentials() -> None:
    assert _command(kubernetes.controller_manager_manifest(API))["use-service-account-credentials"] == "true"


def test_kubeconfigs_reach_the_api_through_the_load_balancer() -> None:
    config = yaml.safe_load(kubernetes.kubeconfig("prod", API.api_endpoint, "system:kube-scheduler",
                                                  "CA", "CERT", "KEY"))
    assert config["clusters"][0]["cluster"]["server"] == "https://10.0.0.100:6443"


def test_static_pods_probe_health_over_https() -> None:
    pod = yaml.safe_load(kubernetes.apiserver_manifest(API))
    probe = pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"], probe["scheme"]) == ("/livez", 6443, "HTTPS")


def test_bundle_is_reproducible_and_keeps_modes_and_owners() -> None:
    files = [HostFile("/etc/etcd/pki/server.key", "KEY", 0o600, "etcd"), HostFile("/etc/etcd/etcd.env", "X=1\n")]
    assert bundle(files) == bundle(list(reversed(files)))
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(bundle(files))))) as tar:
        key = tar.getmember("etc/etcd/pki/server.key")
        assert (key.mode, key.uname) == (0o600, "etcd")


def _apiserver_files() -> dict[str, HostFile]:
    names = ("apiserver", "apiserver-kubelet-client", "apiserver-etcd-client", "front-proxy-client",
             "controller-manager", "scheduler")
    creds = Credentials({n: "CA" for n in ("etcd-ca", "kubernetes-ca", "front-proxy-ca")},
                        {n: ("CERT", "KEY") for n in names}, "CA KEY", "SA KEY", "SA PUB", "ENC")
    cluster = Cluster("prod", SETTINGS, MEMBERS, (), API, BackupPlan("ssh://b/srv", 30, True))
    return {f.path: f for f in apiserver_files(cluster, creds)}


def test_api_servers_get_the_kubelet_and_containerd_units_and_configuration() -> None:
    """Host files, like everything a host needs: `kubelet-install` only adds the binaries and starts the units."""
    files = _apiserver_files()
    kubelet = yaml.safe_load(files[kubernetes.KUBELET_CONFIG].content)
    assert kubelet["staticPodPath"] == "/etc/kubernetes/manifests"
    assert "/etc/kubernetes/manifests/kube-apiserver.yaml" in files, "the kubelet runs the static pods of this bundle"
    assert (kubelet["address"], kubelet["readOnlyPort"], kubelet["authentication"]["anonymous"]["enabled"]) == (
        "127.0.0.1", 0, False)
    unit = files["/etc/systemd/system/kubelet.service"].content
    assert f"ExecStart=/usr/local/bin/kubelet --config={kubernetes.KUBELET_CONFIG}\n" in unit
    assert "Requires=containerd.service\n" in unit and "WantedBy=multi-user.target\n" in unit
    assert "ExecStart=/usr/local/bin/containerd\n" in files["/etc/systemd/system/containerd.service"].content
    containerd = tomllib.loads(str(files["/etc/containerd/config.toml"].content))
    runc = containerd["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["runc"]["options"]
    assert kubelet["cgroupDriver"] == "systemd" and runc == {"SystemdCgroup": True}, "both on systemd's cgroups"
    assert kubelet["containerRuntimeEndpoint"] == kubernetes.CONTAINERD_SOCKET
    major, minor = map(int, versions.CONTAINERD_VERSION.split(".")[:2])
    assert containerd["version"] == 4 and (major, minor) >= (2, 3), "config version 4 needs containerd 2.3 or later"
    assert all(files[p].mode == 0o644 and files[p].owner == "root" for p in (
        kubernetes.KUBELET_CONFIG, "/etc/containerd/config.toml", "/etc/systemd/system/kubelet.service"))
