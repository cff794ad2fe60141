"""`kcp-host metrics` (the facts, the Prometheus file, its server, recorded drills) against a stand-in etcdctl and
systemctl, and `scripts/status` (the report, the takeover's adoption edit, the clouds' bucket status) from facts
and, for GCS, through this machine's `gcloud` against tests/gcs.py's emulator."""

from __future__ import annotations

import datetime
import http.client
import importlib.machinery
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from components.stack_file import project_config, read_stack
from kcp_host import metrics
from kcp_host.contract import BackupEnv, ClusterEnv, render_env
from tests.agent.hostscript_harness import CLIENT, PEER, started, unstarted_learner
from tests.gcs import BUCKET as GCS_BUCKET
from tests.gcs import upload

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "stacks" / "Pulumi.local.yaml"

FAKE_ETCDCTL = r"""#!/usr/bin/env bash
ep=""
for a in "$@"; do case $a in --endpoints=*) ep=${a#--endpoints=} ;; esac; done
case " $* " in
*" member list "*) [[ -f $FAKE_DIR/members.json ]] && cat "$FAKE_DIR/members.json" ;;
*" endpoint status "*) [[ -f $FAKE_DIR/status.json ]] && cat "$FAKE_DIR/status.json" ;;
*" endpoint health "*) printf '[{"endpoint":"%s","health":true}]\n' "$ep" ;;
*) exit 1 ;;
esac
"""
FAKE_SYSTEMCTL = r"""#!/usr/bin/env bash
case "$*" in "is-active --quiet etcd-backup.timer") [[ -f $FAKE_DIR/timer-active ]] ;; *) exit 1 ;; esac
"""


def certificate(path: Path, not_after: datetime.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class AgentHost:
    """One etcd host's files in a folder: cluster.env, backup.env, certificates; stand-in etcdctl and systemctl."""

    def __init__(self, root: Path, name: str = "h1", members: tuple[str, ...] = ("h1", "h2", "h3")) -> None:
        self.root, self.name = root, name
        for folder in ("fake", "bin", "pki", "state", "backup"):
            (root / folder).mkdir(exist_ok=True)
        for program, text in (("etcdctl", FAKE_ETCDCTL), ("systemctl", FAKE_SYSTEMCTL)):
            (root / "bin" / program).write_text(text)
            (root / "bin" / program).chmod(0o755)
        self.declare(members)
        (root / "backup.env").write_text(render_env(BackupEnv(
            dest="ssh://u@10.9.9.20/srv/b/t", cert=str(root / "pki/backup-client.crt"),
            key=str(root / "pki/backup-client.key"), work_dir=str(root / "backup")), "unit test"))

    def declare(self, members: tuple[str, ...]) -> None:
        """cluster.env as the stack renders it for these members."""
        env = ClusterEnv(
            cluster_name="t", member_name=self.name, peer_url=PEER[self.name], client_url=CLIENT[self.name],
            members=tuple(f"{h}={PEER[h]}" for h in members), client_endpoints=tuple(CLIENT[h] for h in members),
            etcd_ca=str(self.root / "pki/ca.crt"), etcd_cert=str(self.root / "pki/server.crt"),
            etcd_key=str(self.root / "pki/server.key"), data_dir=str(self.root / "data"),
            cluster_formed_file=str(self.root / "cluster-formed"), state_dir=str(self.root / "state"),
            etcdctl=str(self.root / "bin/etcdctl"))
        (self.root / "cluster.env").write_text(render_env(env, "unit test"))

    def members(self, *members: dict[str, Any]) -> AgentHost:
        (self.root / "fake/members.json").write_text(json.dumps({"header": {}, "members": list(members)}))
        return self

    def status(self, **values: Any) -> AgentHost:
        (self.root / "backup/status.json").write_text(json.dumps({"format": 1, **values}))
        return self

    def run(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        full = {"PATH": f"{self.root / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                "KCP_CLUSTER_ENV": str(self.root / "cluster.env"), "KCP_BACKUP_ENV": str(self.root / "backup.env"),
                "FAKE_DIR": str(self.root / "fake"), **env}
        return subprocess.run([sys.executable, "-m", "kcp_host", "metrics", *args], env=full, input=stdin,
                              capture_output=True, text=True, timeout=60, check=False)

    def page(self, *args: str) -> dict[str, float]:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        text = (self.root / "state/metrics/kcp.prom").read_text()
        return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                if line and not line.startswith("#")}


MEMBERS = (started("a1", "h1"), started("a2", "h2"), started("a3", "h3"))


@pytest.fixture
def host(tmp_path: Path) -> AgentHost:
    return AgentHost(tmp_path).members(*MEMBERS)


# -- the agent ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("year", [2027, 2049, 2050, 2100])
def test_not_after_reads_the_der_as_openssl_does(tmp_path: Path, year: int) -> None:
    """UTCTime until 2049, GeneralizedTime from 2050 (RFC 5280)."""
    when = datetime.datetime(year, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
    certificate(tmp_path / "c.crt", when)
    assert metrics.not_after((tmp_path / "c.crt").read_text()) == when.timestamp()
    openssl = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(tmp_path / "c.crt")],
                             capture_output=True, text=True, check=False).stdout
    assert openssl.strip() == f"notAfter=Mar  4 05:06:07 {year} GMT"


def test_the_file_says_what_the_backup_job_the_membership_and_the_certificates_say(host: AgentHost) -> None:
    (host.root / "cluster-formed").write_text("")
    (host.root / "fake/timer-active").write_text("")
    certificate(host.root / "pki/server.crt", datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC))
    (host.root / "pki/broken.crt").write_text("not a certificate")
    host.status(last_snapshot="t-20261130T120000Z", last_success="2026-11-30T12:00:05Z",
                last_verified="2026-11-30T12:00:05Z")
    page = host.page("--backup-interval-seconds", "900")
    assert page["kcp_backup_last_snapshot_timestamp_seconds"] == datetime.datetime(
        2026, 11, 30, 12, tzinfo=datetime.UTC).timestamp()
    assert page["kcp_backup_last_success_timestamp_seconds"] == page["kcp_backup_last_snapshot_timestamp_seconds"] + 5
    assert page["kcp_backup_last_failure_timestamp_seconds"] == 0 and page["kcp_backup_last_verification_failed"] == 0
    assert page["kcp_backup_timer_active"] == 1 and page["kcp_backup_interval_seconds"] == 900
    assert page["kcp_etcd_voter"] == 1 and page["kcp_membership_drift"] == 0
    assert page[f'kcp_certificate_expiry_timestamp_seconds{{path="{host.root}/pki/server.crt"}}'] == 1893456000
    assert not any("broken" in key for key in page), "an unreadable certificate exports nothing"
    assert page['kcp_host_info{cluster_name="t",host="h1"}'] == 1
    assert page["kcp_drill_last_timestamp_seconds"] == 0 and page["kcp_drill_last_success_timestamp_seconds"] == 0
    assert abs(page["kcp_metrics_last_collect_timestamp_seconds"] - time.time()) < 60
    assert page["kcp_cluster_formed_timestamp_seconds"] > 0


def test_a_failed_verification_counts_until_a_verified_snapshot(host: AgentHost) -> None:
    reason = "snapshot t-20261130T121500Z failed verification: hashkv: recorded 1, found 2"
    host.status(last_success="2026-11-30T12:00:05Z", last_failure="2026-11-30T12:15:09Z", last_failure_reason=reason)
    assert host.page()["kcp_backup_last_verification_failed"] == 1
    host.status(last_success="2026-11-30T12:00:05Z", last_failure="2026-11-30T12:15:09Z",
                last_failure_reason="upload of t-20261130T121500Z failed")
    assert host.page()["kcp_backup_last_verification_failed"] == 0, "another kind of failure"
    host.status(last_success="2026-11-30T12:30:05Z", last_failure="2026-11-30T12:15:09Z", last_failure_reason=reason)
    assert host.page()["kcp_backup_last_verification_failed"] == 0


def test_membership_is_compared_by_peer_url_and_a_spare_is_no_voter(tmp_path: Path) -> None:
    spare = AgentHost(tmp_path, "spare1").members(started("a1", "h1"), started("a2", "h2"), started("a4", "spare1"))
    page = spare.page()
    assert page["kcp_etcd_voter"] == 1 and page["kcp_membership_drift"] == 2
    assert page[f'kcp_membership_difference{{name="spare1",peer_url="{PEER["spare1"]}",state="undeclared"}}'] == 1
    assert page[f'kcp_membership_difference{{name="h3",peer_url="{PEER["h3"]}",state="missing"}}'] == 1
    spare.members(*MEMBERS, unstarted_learner("a4", "spare1"))
    page = spare.page()
    assert page["kcp_etcd_voter"] == 0, "a learner is no voter"
    assert page[f'kcp_membership_difference{{name="",peer_url="{PEER["spare1"]}",state="undeclared"}}'] == 1
    (tmp_path / "fake/members.json").unlink()
    page = spare.page()
    assert "kcp_etcd_voter" not in page and "kcp_membership_drift" not in page, "no answer, no claim"


def test_a_takeover_is_reported_until_the_stack_lists_the_spare(tmp_path: Path) -> None:
    spare = AgentHost(tmp_path, "spare1").members(started("a1", "h1"), started("a2", "h2"), started("a4", "spare1"))
    (tmp_path / "state/takeover.json").write_text(json.dumps({
        "event": "etcd-spare-takeover", "cluster": "t", "time": "2026-11-30T12:00:00Z",
        "spare": {"name": "spare1", "peer_url": PEER["spare1"], "member_id": "a4"},
        "replaced": {"member_id": "a3", "name": "h3", "peer_urls": PEER["h3"], "unhealthy_since_epoch": 1}}))
    labels = '{replaced="h3",replaced_member_id="a3"}'
    page = spare.page()
    assert page[f"kcp_takeover_adopted{labels}"] == 0
    assert page[f"kcp_takeover_timestamp_seconds{labels}"] == datetime.datetime(
        2026, 11, 30, 12, tzinfo=datetime.UTC).timestamp()
    spare.declare(("h1", "h2", "spare1"))  # what `pulumi up` of the adopted stack writes
    page = spare.page()
    assert page[f"kcp_takeover_adopted{labels}"] == 1 and page["kcp_membership_drift"] == 0


def test_recorded_drills_and_restores_become_metrics_and_a_failed_drill_keeps_the_last_success(
        host: AgentHost) -> None:
    good = {"finished_at": 1000.5, "ok": True, "rto_seconds": 2.3, "rpo_seconds": 310, "snapshot": "t-x"}
    assert host.run("--record-drill", stdin=json.dumps(good)).returncode == 0
    assert host.run("--record-drill", stdin=json.dumps({**good, "finished_at": 2000, "ok": False})).returncode == 0
    assert host.run("--record-restore", stdin=json.dumps({"finished_at": 3000, "rto_seconds": 4.5})).returncode == 0
    page = host.page()
    assert page["kcp_drill_last_timestamp_seconds"] == 2000
    assert page["kcp_drill_last_success_timestamp_seconds"] == 1000.5
    assert page["kcp_drill_last_rto_seconds"] == 2.3 and page["kcp_drill_last_rpo_seconds"] == 310
    assert page["kcp_restore_last_timestamp_seconds"] == 3000 and page["kcp_restore_last_rto_seconds"] == 4.5
    assert "kcp_restore_last_rpo_seconds" not in page
    for bad in ("not json", "[]", '{"ok": true}', '{"finished_at": "yesterday"}', '{"finished_at": NaN}'):
        proc = host.run("--record-drill", stdin=bad)
        assert proc.returncode == 2 and "finished_at" in proc.stderr + "finished_at" and "ERROR" in proc.stderr, bad
    assert json.loads((host.root / "state/last-drill.json").read_text())["finished_at"] == 2000


def test_json_adds_the_local_members_status_and_quota(host: AgentHost) -> None:
    (host.root / "fake/status.json").write_text(json.dumps([{"Endpoint": CLIENT["h1"], "Status": {
        "header": {"member_id": 161, "revision": 42, "raft_term": 3}, "leader": 161, "dbSize": 1 << 20,
        "dbSizeInUse": 1 << 19, "version": "3.5.16"}}]))
    (host.root / "etcd.env").write_text("ETCD_QUOTA_BACKEND_BYTES=4194304\n")
    proc = host.run("--json", "--etcd-env", str(host.root / "etcd.env"))
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)["status"]
    assert status == {"answered": True, "healthy": True, "id": "a1", "leader": True, "learner": False,
                      "db_size": 1 << 20, "db_size_in_use": 1 << 19, "revision": 42, "raft_term": 3,
                      "version": "3.5.16", "errors": [], "quota": 4194304}


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_the_server_sends_the_file_and_nothing_else(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    AgentHost(tmp_path)
    text = (tmp_path / "cluster.env").read_text().replace(CLIENT["h1"], "https://127.0.0.1:2379")
    (tmp_path / "cluster.env").write_text(text + f"KCP_METRICS_PORT={port}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KCP_CLUSTER_ENV": str(tmp_path / "cluster.env")}
    server = subprocess.Popen([sys.executable, "-m", "kcp_host", "metrics", "--serve"], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _get(port, "/metrics")[0] == 503, "no file yet"
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.1)
        (tmp_path / "state/metrics").mkdir(parents=True)
        (tmp_path / "state/metrics/kcp.prom").write_text("kcp_x 1\n")
        assert _get(port, "/metrics") == (200, b"kcp_x 1\n")
        assert _get(port, "/metrics?x=1") == (200, b"kcp_x 1\n")
        assert _get(port, "/../../etc/passwd")[0] == 404 and _get(port, "/")[0] == 404
        assert _get(port, "/metrics", "POST")[0] == 501
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- scripts/status -----------------------------------------------------------------------------------------
def _status_module() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("kcp_status", str(ROOT / "scripts" / "status"))
    spec = importlib.util.spec_from_loader("kcp_status", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kcp_status"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


status = _status_module()
NOW = 1_800_000_000.0
LOCAL_PEER = {h: f"https://10.250.0.1{i}:2380" for i, h in enumerate(["h1", "h2", "h3", "spare1"], 1)}


def _facts(name: str, members: list[str], learners: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    declared = ["h1", "h2", "h3"]
    listed = [{"id": f"{i:x}", "name": m, "peer_urls": [LOCAL_PEER[m]], "client_urls": [], "learner": m in learners}
              for i, m in enumerate(members, 1)]
    facts: dict[str, Any] = {
        "cluster": "local", "host": name, "peer_url": LOCAL_PEER[name], "time": NOW, "formed_at": NOW - 90 * 86400,
        "declared": [{"name": d, "peer_url": LOCAL_PEER[d]} for d in declared], "not_a_member": None,
        "membership": {"members": listed, "voter": name in members and name not in learners,
                       "undeclared": [{"name": m, "peer_url": LOCAL_PEER[m], "learner": False}
                                      for m in members if m not in declared],
                       "missing": [{"name": d, "peer_url": LOCAL_PEER[d]} for d in declared if d not in members]},
        "backup": {"timer_active": name != "spare1", "interval_seconds": 900, "last_snapshot": None,
                   "last_success": None, "last_snapshot_taken": None, "last_verified": None, "last_failure": None,
                   "last_run_failed": False, "verification_failed": False, "delta_seconds": 10,
                   "last_delta": None, "last_delta_revision": None},
        "takeover": None, "drill": {"finished_at": NOW - 86400, "ok": True, "rto_seconds": 2.3, "rpo_seconds": 300,
                                    "snapshot": "local-x", "last_success": NOW - 86400},
        "restore": None,
        "certificates": [{"path": "/etc/etcd/pki/server.crt", "not_after": NOW + 300 * 86400}],
        "status": {"answered": True, "healthy": True, "leader": name == "h1", "db_size": 2 << 20, "quota": 8 << 30,
                   "revision": 77, "id": "1"},
    }
    return {**facts, **extra}


def _healthy() -> dict[str, Any]:
    hosts = {h: _facts(h, ["h1", "h2", "h3"]) for h in ("h1", "h2", "h3", "spare1")}
    hosts["h1"]["backup"] |= {"last_snapshot": "local-a", "last_success": NOW - 300, "last_snapshot_taken": NOW - 305,
                              "last_verified": NOW - 300, "last_delta": NOW - 3, "last_delta_revision": 77}
    return {"hosts": hosts, "destination": {"where": "10.250.0.20:/srv/etcd-backups/local",
                                            "last_snapshot": "local-a", "last_success": "2027-01-15T07:55:00Z"}}


def _analyse(gathered: dict[str, Any], raw: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = status.analyse(read_stack(LOCAL), raw or project_config(LOCAL), gathered, "local", NOW)
    return report


def test_a_healthy_cluster_needs_no_attention() -> None:
    report = _analyse(_healthy())
    assert report["attention"] == []
    assert [(m["name"], m["role"], m["leader"], m["quota_percent"]) for m in report["members"]] == [
        ("h1", "voter", True, 0.0), ("h2", "voter", False, 0.0), ("h3", "voter", False, 0.0)]
    assert report["spares"][0]["role"] == "not a member" and report["drift"] is None
    assert report["backups"]["recovery_point_seconds"] == 3, "the delta log, not the snapshot, is the newest point"
    assert report["backups"]["taken_on"] == "h1"
    text = status.render_text(report)
    assert "  h1    rack-a  voter  *       2.0 MiB  0.0%     77        healthy" in text
    assert "spare1 (rack-a, 10.250.0.14): watching" in text and "recovery point   3s ago" in text
    assert "last delta       revision 77 archived as of 2027-01-15T07:59:57Z (on h1)" in text
    assert "LAST DR DRILL: " in text and "RTO 2.30s, RPO 5m0s" in text and text.endswith("Nothing needs attention.\n")


def test_a_delta_log_that_stopped_needs_attention_and_the_recovery_point_falls_back_to_the_snapshot() -> None:
    gathered = _healthy()
    gathered["hosts"]["h1"]["backup"] |= {"last_delta": NOW - 91}
    report = _analyse(gathered)
    assert report["attention"] == ["the delta log is 1m31s behind: a loss of quorum loses writes back to the newest "
                                   "snapshot (journalctl -u etcd-delta-archive on the leader)"]
    assert report["backups"]["recovery_point_seconds"] == 91
    gathered["hosts"]["h1"]["backup"] |= {"last_delta": NOW - 89}
    assert _analyse(gathered)["attention"] == [], "three chunk intervals and a minute: not behind yet"


def test_old_backups_stopped_timers_failed_verification_and_expiring_certificates_need_attention() -> None:
    gathered = _healthy()
    hosts = gathered["hosts"]
    hosts["h1"]["backup"] |= {"last_snapshot_taken": NOW - 3 * 900}
    hosts["h2"]["backup"] |= {"timer_active": False, "last_failure": NOW - 10, "last_run_failed": True,
                              "verification_failed": True, "last_failure_reason": "snapshot x failed verification"}
    hosts["h3"]["certificates"][0]["not_after"] = NOW + 5 * 86400
    hosts["h3"]["status"]["db_size"] = 7 << 30
    report = _analyse(gathered)
    assert report["attention"] == [
        "member h3: database at 87.5% of its quota",
        "the newest snapshot is 45m0s old (interval 15m0s)",
        "etcd-backup.timer is not active on member h2",
        "the newest snapshot taken on h2 failed verification: snapshot x failed verification",
        "/etc/etcd/pki/server.crt on h3 expires in 5.0 days"]
    assert report["backups"]["last_failure_on"] == "h2"


def _taken_over() -> dict[str, Any]:
    after = ["h1", "h2", "spare1"]
    hosts = {h: _facts(h, after) for h in ("h1", "h2", "spare1")}
    hosts["h3"] = {"error": "ssh: connect to host 10.250.0.13 port 22: Connection refused"}
    hosts["spare1"]["takeover"] = {
        "time": "2027-01-15T07:50:00Z", "at": NOW - 600, "adopted": False,
        "spare": {"name": "spare1", "peer_url": LOCAL_PEER["spare1"], "member_id": "4"},
        "replaced": {"member_id": "3", "name": "h3", "peer_urls": LOCAL_PEER["h3"], "unhealthy_since_epoch": 1}}
    return {"hosts": hosts, "destination": {"where": "x", "last_snapshot": "local-a"}}


def test_a_takeover_comes_with_the_exact_stack_edit_that_adopts_it() -> None:
    report = _analyse(_taken_over())
    drift = report["drift"]
    assert [m["name"] for m in drift["undeclared"]] == ["spare1"] and [m["name"] for m in drift["missing"]] == ["h3"]
    adopt = drift["adopt"]
    assert adopt["forget"] == ["h3"] and adopt["invalid"] is None and adopt["spares"] == []
    assert adopt["hosts"][2] == {"name": "spare1", "address": "10.250.0.14", "zone": "rack-c",
                                 "roles": ["etcd", "apiserver", "loadbalancer"]}
    assert "rack-a" in adopt["notes"][0], "the spare's own zone would put a quorum in rack-a"
    assert drift["unexplained"] == []
    text = status.render_text(report)
    assert "took over h3 (member 3) at 2027-01-15T07:50:00Z as member 4; NOT adopted" in text
    assert "    scripts/forget-host local h3\n" in text
    roles = "roles: [etcd, apiserver, loadbalancer]}"
    assert f"    -      - {{name: h3, address: 10.250.0.13, zone: rack-c, {roles}\n" in text
    assert f"    +      - {{name: spare1, address: 10.250.0.14, zone: rack-c, {roles}\n" in text
    assert "    +    spares: []\n" in text
    assert any(a.startswith("h3 (10.250.0.13) did not answer") for a in report["attention"])
    assert any(a.startswith("spare spare1 took over h3's slot") for a in report["attention"])
    # The edit, applied, is a valid stack whose members are the cluster's.
    raw = project_config(LOCAL)
    raw["baremetal"] |= {"hosts": adopt["hosts"], "spares": adopt["spares"]}
    assert status.validates(raw) is None
    assert [h["name"] for h in raw["baremetal"]["hosts"]] == ["h1", "h2", "spare1"]


def test_the_edit_writes_hosts_in_the_stacks_key_order_whatever_order_the_file_had() -> None:
    """A stack file written by a YAML dumper has its keys sorted: the edit must still show only what changes."""
    host = {"zone": "rack-a", "roles": ["etcd"], "name": "h1", "hostKey": "ssh-ed25519 AAAA", "address": "10.0.0.1"}
    assert status.yaml_lists({"hosts": [host]})[1] == \
        "      - {name: h1, address: 10.0.0.1, zone: rack-a, roles: [etcd], hostKey: ssh-ed25519 AAAA}\n"


def test_the_spare_keeps_its_own_zone_where_the_rules_allow_it() -> None:
    raw = project_config(LOCAL)
    raw["zones"] = ["rack-a", "rack-b", "rack-c", "rack-d"]
    raw["baremetal"]["spares"][0]["zone"] = "rack-d"
    adopt = _analyse(_taken_over(), raw)["drift"]["adopt"]
    assert adopt["hosts"][2]["zone"] == "rack-d" and adopt["notes"] == [] and adopt["invalid"] is None


def test_an_adopted_takeover_and_a_manual_member_add() -> None:
    gathered = _healthy()
    gathered["hosts"]["h1"]["membership"]["undeclared"] = [{"name": "x9", "peer_url": "https://10.9.9.9:2380"}]
    drift = _analyse(gathered)["drift"]
    assert drift["adopt"] is None and drift["unexplained"] == ["x9"]
    assert "no takeover report explains x9" in status.render_text(_analyse(gathered))


def test_restore_reports_get_their_end_from_their_file(tmp_path: Path) -> None:
    report = tmp_path / "restore.json"
    report.write_text(json.dumps({"snapshot": "local-a", "taken_at": "2027-01-15T07:00:00Z", "rto_seconds": 2.2,
                                  "total_seconds": 3.0}))
    end = datetime.datetime(2027, 1, 15, 7, 10, 3, tzinfo=datetime.UTC).timestamp()
    os.utime(report, (end, end))
    assert status.restore_record(report) == {"finished_at": end, "ok": True, "rto_seconds": 2.2,
                                             "rpo_seconds": 600.0, "snapshot": "local-a"}
    drill = tmp_path / "drill.json"
    drill.write_text(json.dumps({"ok": False, "snapshot": "s", "rto_seconds": 1.0, "rpo_seconds": 60.0,
                                 "finished_at": "2027-01-15T07:00:00Z"}))
    assert status.drill_record(drill)["finished_at"] == datetime.datetime(
        2027, 1, 15, 7, tzinfo=datetime.UTC).timestamp()


FAKE_AWS = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/aws-calls"
case "$2" in
list-objects-v2) printf '{"Contents": [{"Key": "prod/backups/status/20270115T070000Z-a.json"},
                   {"Key": "prod/backups/status/20270115T073000Z-b.json"}]}' ;;
get-object) printf '{"last_snapshot": "prod-20270115T073000Z", "last_success": "2027-01-15T07:30:09Z"}' >"$7"
            echo '{}' ;;
*) exit 1 ;;
esac
"""


def test_the_clouds_status_comes_from_the_outputs_and_the_newest_status_object(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aws").write_text(FAKE_AWS)
    (tmp_path / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    (tmp_path / "outputs.json").write_text(json.dumps({
        "backupLocation": "s3://bucket/prod/backups", "apiEndpoint": "https://x:6443",
        "etcdClientEndpoints": ["https://10.20.0.10:2379", "https://10.20.1.10:2379", "https://10.20.2.10:2379"]}))
    cfg = read_stack(ROOT / "stacks" / "Pulumi.aws-example.yaml")
    args = type("Args", (), {"outputs": tmp_path / "outputs.json", "stack": "aws-example"})()
    gathered = status.gather_cloud(cfg, args)
    assert gathered["destination"]["object"] == "s3://bucket/prod/backups/status/20270115T073000Z-b.json"
    now = datetime.datetime(2027, 1, 15, 7, 40, tzinfo=datetime.UTC).timestamp()
    report = status.analyse(cfg, {}, gathered, "aws-example", now)
    assert report["backups"]["recovery_point_seconds"] == 600 and report["attention"] == []
    assert [m["endpoint"] for m in report["members"]] == gathered["outputs"]["etcdClientEndpoints"]
    assert "not reachable from this machine" in status.render_text(report)
    assert "--prefix prod/backups/status/" in (tmp_path / "aws-calls").read_text()


def test_on_gce_the_status_is_the_newest_status_object_read_through_gcloud(gcs: str, tmp_path: Path) -> None:
    """This machine's `gcloud storage ls` and `cat` against tests/gcs.py's emulator: the newest of the status
    objects each backup run adds (docs/backups.md), by name (`<UTC stamp>-<host>.json`)."""
    for name, last in (("20270115T070000Z-a", "prod-20270115T070000Z"), ("20270115T073000Z-b", "prod-20270115T073000Z"),
                       ("20270115T063000Z-c", "prod-20270115T063000Z")):
        upload(gcs, f"prod/backups/status/{name}.json", json.dumps({"last_snapshot": last}).encode(), {})
    upload(gcs, "prod/backups/snapshots/prod-20270115T080000Z.json", b"{}", {})  # not a status object
    (tmp_path / "outputs.json").write_text(json.dumps({"backupLocation": f"gs://{GCS_BUCKET}/prod/backups"}))
    args = type("Args", (), {"outputs": tmp_path / "outputs.json", "stack": "gce-example"})()
    destination = status.gather_cloud(read_stack(ROOT / "stacks" / "Pulumi.gce-example.yaml"), args)["destination"]
    assert destination["object"] == f"gs://{GCS_BUCKET}/prod/backups/status/20270115T073000Z-b.json", destination
    assert destination["last_snapshot"] == "prod-20270115T073000Z"
    (tmp_path / "outputs.json").write_text(json.dumps({"backupLocation": f"gs://{GCS_BUCKET}/other"}))
    assert "error" in status.gather_cloud(read_stack(ROOT / "stacks" / "Pulumi.gce-example.yaml"), args)["destination"]


def test_a_stack_that_does_not_validate_exits_2(tmp_path: Path) -> None:
    (tmp_path / "Pulumi.bad.yaml").write_text("config:\n  resilient-control-plane:target: nowhere\n")
    assert status.main([str(tmp_path / "Pulumi.bad.yaml")]) == 2
