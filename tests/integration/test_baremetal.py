"""Policy on real hosts: the commands the program declares for the `local` stack form a
working, TLS-secured etcd cluster and an HA API endpoint on bare metal reached over SSH.

kube-apiserver cannot be installed here, so a stand-in HTTPS server (named as such)
answers /readyz on 6443 with the API server certificate the program issued; HAProxy,
keepalived, nftables and etcd are the real ones, configured by the program.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from components.render.loadbalancer import ADVERT_INTERVAL_SECONDS
from tests.figures import record
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration

# Stand-in for kube-apiserver: openssl's TLS server with the API server certificate the
# program issued, serving the file "readyz" (and livez/healthz) from its directory.
STANDIN_APISERVER = ("mkdir -p /run/apiserver-standin && cd /run/apiserver-standin && "
                     "for p in readyz livez healthz; do printf ok > $p; done && "
                     "systemctl stop apiserver-standin 2>/dev/null || true; "
                     "systemd-run --unit=apiserver-standin --working-directory=/run/apiserver-standin "
                     "openssl s_server -quiet -WWW -accept {address}:6443 "
                     "-cert /etc/kubernetes/pki/apiserver.crt -key /etc/kubernetes/pki/apiserver.key")


def _etcdctl_from(cluster: Deployment, host: str, endpoint: str, *args: str, tls: bool = True,
                  cert: tuple[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """This machine's etcdctl, run inside `host`'s network namespace (its address, its firewall view)."""
    ca, client_cert, client_key = cluster.client_tls
    flags = [f"--endpoints={endpoint}", "--dial-timeout=3s", "--command-timeout=5s"]
    if tls:
        flags.append(f"--cacert={ca}")
        chosen = cert or (str(client_cert), str(client_key))
        if chosen:
            flags += [f"--cert={chosen[0]}", f"--key={chosen[1]}"]
    argv = ["env", "ETCDCTL_API=3", "etcdctl", *flags, *args]
    return cluster.sandbox.run_in_netns(host, argv, timeout=30)


def _tcp_open(cluster: Deployment, from_host: str, address: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('{address}', {port}), timeout=2).close()"
    return cluster.sandbox.run_in_netns(from_host, ["python3", "-c", probe], timeout=10).returncode == 0


@pytest.fixture(scope="module")
def standin_apiservers(local_cluster: Deployment) -> Iterator[None]:
    """Start the kube-apiserver stand-in on every API host (a transient unit, gone on reboot)."""
    for host in local_cluster.members:
        address = local_cluster.sandbox.address(host)
        local_cluster.sandbox.ssh(host, STANDIN_APISERVER.format(address=address))
    yield


def _readyz_through_vip(cluster: Deployment) -> bool:
    ca = cluster.workdir / "kubernetes-ca.crt"
    ca.write_text(cluster.output("local-pki-kubernetes-ca", "certPem"))
    result = subprocess.run(["curl", "-sf", "--max-time", "1", "--cacert", str(ca),
                             f"https://{cluster.api_vip}:6443/readyz"], capture_output=True, check=False)
    return result.returncode == 0 and result.stdout == b"ok"


def _vip_holder(cluster: Deployment) -> str | None:
    for host in cluster.members:
        if not cluster.sandbox.is_running(host):
            continue
        shown = cluster.sandbox.ssh(host, "ip -4 -o addr show dev eth0", check=False).stdout.decode()
        if f" {cluster.api_vip}/" in shown:
            return host
    return None


def test_three_member_etcd_cluster_is_healthy_and_members_agree(local_cluster: Deployment) -> None:
    views = []
    for host in local_cluster.members:
        local_cluster.etcdctl(host, "endpoint", "health")
        listed = json.loads(local_cluster.etcdctl(host, "member", "list", "-w", "json").stdout)
        views.append(sorted((m["name"], m["ID"]) for m in listed["members"]))
    assert len(views[0]) == 3, f"expected 3 members, got {views[0]}"
    assert all(view == views[0] for view in views), f"members disagree on the member list: {views}"


def test_api_server_client_certificate_writes_and_reads_through_the_etcd_load_balancer(
        local_cluster: Deployment) -> None:
    vip = f"https://{local_cluster.api_vip}:2379"
    put = _etcdctl_from(local_cluster, "backup", vip, "put", "/policy/lb", "through-haproxy")
    assert put.returncode == 0, put.stderr.decode()
    got = _etcdctl_from(local_cluster, "backup", vip, "get", "/policy/lb", "--print-value-only")
    assert got.stdout.decode().strip() == "through-haproxy"


def test_etcd_refuses_clients_without_certificate_with_a_foreign_ca_or_over_plain_http(
        local_cluster: Deployment) -> None:
    member = f"https://{local_cluster.sandbox.address('h1')}:2379"
    no_cert = _etcdctl_from(local_cluster, "backup", member, "get", "/x", cert=("", ""))
    assert no_cert.returncode != 0, "a client with no certificate was served"
    foreign_dir = local_cluster.workdir / "foreign"
    foreign_dir.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=intruder", "-days", "1", "-keyout", str(foreign_dir / "k.pem"),
                    "-out", str(foreign_dir / "c.pem")], check=True, capture_output=True)
    foreign = _etcdctl_from(local_cluster, "backup", member, "get", "/x",
                            cert=(str(foreign_dir / "c.pem"), str(foreign_dir / "k.pem")))
    assert foreign.returncode != 0, "a client certificate from another CA was accepted"
    plain = _etcdctl_from(local_cluster, "backup", member.replace("https", "http"), "get", "/x", tls=False)
    assert plain.returncode != 0, "etcd answered plain HTTP on the client port"


def test_only_allowed_hosts_reach_etcd_ports(local_cluster: Deployment) -> None:
    h1 = local_cluster.sandbox.address("h1")
    assert _tcp_open(local_cluster, "h2", h1, 2380), "a member cannot reach a peer port"
    assert _tcp_open(local_cluster, "backup", h1, 2379), "the backup host cannot reach the client port"
    assert not _tcp_open(local_cluster, "outsider", h1, 2379), "a host that is no API server reached 2379"
    assert not _tcp_open(local_cluster, "outsider", h1, 2380), "a non-member reached 2380"
    assert not _tcp_open(local_cluster, "backup", h1, 2380), "the backup host (no member) reached 2380"
    assert not _tcp_open(local_cluster, "outsider", h1, 2381), "a non-load-balancer reached etcd's health port"


def test_replaying_everything_again_keeps_the_cluster_and_its_member_ids(local_cluster: Deployment) -> None:
    before = json.loads(local_cluster.etcdctl("h1", "member", "list", "-w", "json").stdout)["members"]
    local_cluster.replay.create()
    after = json.loads(local_cluster.etcdctl("h1", "member", "list", "-w", "json").stdout)["members"]
    assert sorted(m["ID"] for m in before) == sorted(m["ID"] for m in after)
    for host in local_cluster.members:
        local_cluster.etcdctl(host, "endpoint", "health")


def test_killing_the_vip_holder_moves_the_vip_and_readyz_answers_again(
        local_cluster: Deployment, standin_apiservers: None) -> None:
    deadline = time.monotonic() + 30
    while not _readyz_through_vip(local_cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    holder = _vip_holder(local_cluster)
    assert holder is not None and _readyz_through_vip(local_cluster), "/readyz never answered through the VIP"
    local_cluster.sandbox.kill_host(holder)
    killed = time.monotonic()
    answered = None
    while time.monotonic() - killed < 20:
        if _readyz_through_vip(local_cluster):
            answered = time.monotonic()
            break
        time.sleep(0.05)
    assert answered is not None, "the API VIP did not come back within 20 s"
    gap = answered - killed
    new_holder = _vip_holder(local_cluster)
    print(f"\nVIP moved from {holder} to {new_holder}")
    record("API VIP failover gap", gap, "keepalived advertisement interval", ADVERT_INTERVAL_SECONDS, "<= 3 s")
    assert new_holder not in (None, holder)
    assert gap <= 3.0, f"VIP failover gap {gap:.2f} s exceeds 3 s"
    local_cluster.sandbox.start_host(holder)
    local_cluster.sandbox.wait_ssh(holder, timeout=60)
    local_cluster.etcdctl(holder, "endpoint", "health", timeout=90)


def test_member_removal_is_refused_when_it_would_lose_quorum(local_cluster: Deployment) -> None:
    """With h3 down, removing h1 would leave h2 alone out of two members: no quorum."""
    before = local_cluster.etcdctl("h2", "member", "list").stdout
    local_cluster.sandbox.kill_process("h3", "etcd")
    local_cluster.sandbox.ssh("h3", "systemctl stop etcd")
    try:
        refused = local_cluster.sandbox.ssh("h1", "/usr/local/lib/kcp/kcp-host etcd-member-leave", check=False)
        assert refused.returncode != 0 and b"refusing" in refused.stderr, refused.stderr.decode()
        assert local_cluster.etcdctl("h2", "member", "list").stdout == before
        assert local_cluster.sandbox.ssh("h1", "systemctl is-active etcd", check=False).stdout.strip() == b"active"
    finally:
        local_cluster.sandbox.ssh("h3", "systemctl start etcd")
    local_cluster.etcdctl("h3", "endpoint", "health", timeout=90)


def test_replaying_the_delete_steps_leaves_the_hosts_clean(local_cluster: Deployment) -> None:
    local_cluster.replay.delete()
    for host in [*local_cluster.members, *local_cluster.spares]:
        state = local_cluster.sandbox.ssh(
            host, "systemctl is-active etcd etcd-backup.timer etcd-spare-watch.timer; "
                  "ls /usr/local/lib/kcp /etc/etcd/cluster-formed 2>&1", check=False).stdout.decode()
        assert "\nactive" not in f"\n{state}", f"{host} still runs a unit: {state}"
        assert "No such file" in state, f"{host} still has kcp files: {state}"
