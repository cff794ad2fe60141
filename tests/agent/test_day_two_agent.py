"""Day-two guards of the host agent that run without etcd: what restarts a member, what a firewall
change may cut off, and who the etcd load balancer falls back to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from components.render import etcd, loadbalancer
from kcp_host.contract import DELTA_UNIT, METRICS_HTTP_UNIT, ClusterEnv
from kcp_host.lifecycle import config_fingerprint
from tests.agent.hostscript_harness import CLIENT, ROOT, Host, started

SETTINGS = etcd.EtcdSettings("t", 100, 1000, "t-etcd")
MEMBERS = (etcd.Member("h1", "10.0.0.11"), etcd.Member("h2", "10.0.0.12"), etcd.Member("h3", "10.0.0.13"))


def fingerprint(tmp_path: Path, members=MEMBERS, settings=SETTINGS, cert: str = "cert-1") -> str:
    (tmp_path / "units").mkdir(exist_ok=True)
    (tmp_path / "units" / "etcd.service").write_text(etcd.etcd_unit("t"))
    text = etcd.etcd_env(settings, members[0], members).replace(etcd.PKI, str(tmp_path))
    (tmp_path / "etcd.env").write_text(text)
    for name in ("ca.crt", "server.crt", "server.key", "peer.crt", "peer.key"):
        (tmp_path / name).write_text(cert if name == "server.crt" else name)
    env = ClusterEnv("t", "h1", "p", "c", (), (), "ca", "cert", "key", "/d")
    return config_fingerprint(env, str(tmp_path / "etcd.env"), str(tmp_path / "units"))


def test_a_membership_change_does_not_restart_a_member(tmp_path: Path) -> None:
    """Only the bootstrap settings name the other members: adding h4 changes nothing etcd reads."""
    bigger = (*MEMBERS, etcd.Member("h4", "10.0.0.14"))
    assert fingerprint(tmp_path) == fingerprint(tmp_path, members=bigger)


def test_new_timing_or_new_certificates_restart_a_member(tmp_path: Path) -> None:
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path, settings=etcd.EtcdSettings("t", 100, 1200, "t-etcd")) != before
    assert fingerprint(tmp_path, cert="cert-2") != before


def test_a_firewall_that_would_lock_out_the_program_is_refused_before_anything_changes(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    for tool in ("nft", "systemctl"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (tmp_path / tool).chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "SSH_CONNECTION": "192.0.2.7 50000 10.0.0.11 22"}
    proc = subprocess.run([sys.executable, "-m", "kcp_host", "firewall-apply", "--operators=10.250.0.0/24"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "192.0.2.7" in proc.stderr and "baremetal.operatorCidrs" in proc.stderr
    assert not calls.exists(), f"the firewall was touched: {calls.read_text()}"


def test_spares_back_the_etcd_load_balancer_up_without_taking_traffic_from_members() -> None:
    spare = etcd.Member("spare1", "10.0.0.14")
    config = loadbalancer.haproxy_config("10.0.0.100", MEMBERS, MEMBERS, (spare,))
    backend = config.split("backend etcd-members", 1)[1]
    assert "server spare1 10.0.0.14:2379 backup" in backend
    assert all(f"server {m.name} {m.address}:2379\n" in backend for m in MEMBERS), "members are not backups"


def test_waiting_for_health_holds_until_every_named_member_votes(tmp_path: Path) -> None:
    """A grown cluster's `pulumi up` ends only once the new members vote: a learner still catching up keeps the
    wait going (and fails it at the timeout, naming the member); once it votes, the health check decides."""
    learner = {**started("4", "spare1"), "isLearner": True}
    (tmp_path / "learner").mkdir()
    (tmp_path / "voter").mkdir()
    host = Host(tmp_path / "learner").peers(started("1", "h1"), started("2", "h2"), started("3", "h3"), learner)
    waiting = host.run("etcd-wait-healthy", "1", "--voters=h1,h2,h3,spare1")
    assert waiting.returncode == 1 and "not voting members after 1s: spare1" in waiting.stderr, waiting.stderr
    voter = Host(tmp_path / "voter").peers(started("1", "h1"), started("2", "h2"), started("3", "h3"),
                                           started("4", "spare1"))
    unhealthy = voter.run("etcd-wait-healthy", "1", "--voters=h1,h2,h3,spare1")
    assert unhealthy.returncode == 1 and "etcd not healthy after" in unhealthy.stderr, unhealthy.stderr


def test_a_new_build_restarts_the_agents_services_that_run_and_nothing_else(tmp_path: Path) -> None:
    """The archiver runs, the metrics server is stopped (or absent: the backup host, a first `up`)."""
    calls = tmp_path / "calls"
    (tmp_path / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                        f'case "$*" in "is-active --quiet {DELTA_UNIT}"|restart*) exit 0 ;; esac\n'
                                        'exit 3\n')
    (tmp_path / "systemctl").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "kcp_host", "restart-agent-services"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [f"is-active --quiet {DELTA_UNIT}", f"restart {DELTA_UNIT}",
                                              f"is-active --quiet {METRICS_HTTP_UNIT}"]
    assert f"restarted {DELTA_UNIT}" in proc.stderr + proc.stdout


def test_a_leaving_member_is_removed_through_the_members_that_stay(tmp_path: Path) -> None:
    """Asked of itself, the leaving member may stop before it answers ("etcdserver: server stopped", seen once in
    the delete replay of test_baremetal) though the removal went through, and the delete step fails."""
    host = Host(tmp_path).peers(started("1", "h1"), started("2", "h2"), started("3", "h3"))
    (tmp_path / "bin" / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "systemctl-calls"}\n')
    healthy = json.dumps([{"endpoint": CLIENT[h], "health": True} for h in ("h1", "h2", "h3")])
    etcdctl = tmp_path / "etcdctl"
    answers = f"*\" endpoint health -w json \"*) echo '{healthy}' ;;\n*\" member remove \"*) ;;\n"
    etcdctl.write_text(etcdctl.read_text().replace('case " $* " in\n', 'case " $* " in\n' + answers))
    left = host.run("etcd-member-leave")
    assert left.returncode == 0, left.stderr
    (removal,) = [call for call in host.calls().splitlines() if " member remove " in f" {call} "]
    assert f"--endpoints={CLIENT['h2']},{CLIENT['h3']} " in removal, removal
    assert "disable --now etcd" in (tmp_path / "systemctl-calls").read_text()
