"""Metrics and alerts on real hosts, watched by a real Prometheus (Debian's `prometheus` package).

The `local` stack is deployed with `baremetal.monitoringCidrs` set to this machine's address on the
sandbox bridge, where Prometheus runs as a process this module starts (bound to that address, its
data in a scratch folder), scraping etcd's metrics (2381) and the agent's (2382) every 2 s with
`monitoring/alerts.yml`'s rules, in a test copy whose `for:` durations are cut to 4 s (nothing else
changes). Then: the backup timers stop and the backup alert fires (and resolves when they start
again); a member's host is killed and EtcdMemberDown fires, then resolves once it is back; a spare
takes over a dead member, its alert fires, and `scripts/status` shows the takeover and the stack
edit that adopts it. Every wait is bounded; Prometheus is stopped by its pid and its files removed.

Run beside other test beds with KCP_TEST_SANDBOX=name:subnet (e.g. `mo:10.250.43`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.render import monitoring
from components.render.etcd import Member
from testbed.sandbox import Sandbox
from tests.integration.conftest import Deployment, deployed
from tests.program import ROOT

pytestmark = pytest.mark.integration
TEST_FOR = "4s"  # every alert's `for:` in the test copy of the rules
SCRAPE = "2s"


def log(message: str) -> None:
    print(f"[monitoring] {message}", file=sys.stderr, flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    """check() until it returns something true; its value. Bounded: AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


@pytest.fixture(scope="module")
def monitored() -> Iterator[Deployment]:
    """The `local_cluster` fixture's deployment, with the monitoring range set to this machine's bridge address."""
    def monitoring_from_here(cfg: dict[str, Any], sandbox: Sandbox) -> None:
        cfg["baremetal"]["monitoringCidrs"] = [f"{sandbox.gateway}/32"]

    started = time.monotonic()
    with deployed("kcp-monitoring-", monitoring_from_here) as deployment:
        log(f"deployed in {time.monotonic() - started:.0f} s")
        yield deployment


def collect(deployment: Deployment, host: str) -> None:
    """One `kcp-host metrics` run now (the timer's runs go on as well); a failure shows the unit's journal."""
    run = deployment.sandbox.start_unit(host, "kcp-metrics.service")
    journal = deployment.sandbox.ssh(host, "systemctl status --no-pager -l kcp-metrics.service; journalctl -b "
                                           "--no-pager -o short-precise -u kcp-metrics.service | tail -30",
                                     check=False, timeout=60) if run.returncode else None
    assert journal is None, f"{host}: kcp-metrics.service failed:\n{journal.stdout.decode(errors='replace')}"


def metrics_of(sandbox: Sandbox, host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{sandbox.address(host)}:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def samples(text: str, name: str) -> dict[str, float]:
    """`labels -> value` of one metric in a Prometheus text page."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            labels, _, value = line[len(name):].rpartition(" ")
            found[labels] = float(value)
    return found


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str, **query: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(query)}", timeout=10) as answer:
            return json.loads(answer.read())["data"]

    def firing(self, alert: str, **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == alert
                and a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items())]

    def active(self, alert: str, **labels: str) -> list[dict[str, Any]]:
        """Pending or firing."""
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == alert
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])


def rules_test_copy(folder: Path) -> Path:
    """monitoring/alerts.yml with every `for:` cut to TEST_FOR, and nothing else changed."""
    rules = yaml.safe_load(monitoring.RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = SCRAPE
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    path = folder / "test-copy-of-alerts.yml"
    path.write_text(f"# TEST COPY of monitoring/alerts.yml: every `for:` is {TEST_FOR}. Not for production.\n"
                    + yaml.safe_dump(rules, sort_keys=False))
    return path


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(monitored: Deployment) -> Iterator[Prometheus]:
    if shutil.which("prometheus") is None:
        pytest.skip(reason="no prometheus binary (Debian's prometheus package); runs once scripts/install-deps "
                           "(as root) has installed it")
    sandbox, folder = monitored.sandbox, monitored.workdir / "prometheus"
    folder.mkdir()
    members = [Member(h, sandbox.address(h)) for h in monitored.members]
    spares = [Member(h, sandbox.address(h)) for h in monitored.spares]
    jobs = monitoring.scrape_config("local", members, spares, interval=SCRAPE)
    for job in jobs:
        job["scrape_timeout"] = SCRAPE
    config = {"global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
              "rule_files": [str(rules_test_copy(folder))], "scrape_configs": jobs}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run(["promtool", "check", "config", str(folder / "prometheus.yml")], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    listen = f"{sandbox.gateway}:{free_port(sandbox.gateway)}"
    with open(folder / "prometheus.log", "wb") as output:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={listen}", "--storage.tsdb.retention.time=1d"],
            stdout=output, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://{listen}", process)
    try:
        def ready() -> bool:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False
        wait_for("Prometheus ready", ready, 60, every=1)
        log(f"Prometheus {listen} (pid {process.pid}), rules {folder / 'test-copy-of-alerts.yml'}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_every_etcd_host_serves_its_metrics_only_to_the_monitoring_range(monitored: Deployment) -> None:
    sandbox = monitored.sandbox
    # A key, then a snapshot now (the leader acts; its verification runs too), so the backup metrics show one.
    monitored.etcdctl(monitored.members[0], "put", "/kcp-test/monitoring", "on")
    for member in monitored.members:
        started = sandbox.start_unit(member, "etcd-backup.service", timeout=600)
        assert started.returncode == 0, f"{member}: {started.stderr.decode(errors='replace')}"
    for host in (*monitored.members, *monitored.spares):
        collect(monitored, host)
    pages = {h: metrics_of(sandbox, h, monitoring.AGENT_PORT) for h in (*monitored.members, *monitored.spares)}
    for host, page in pages.items():
        member = host in monitored.members
        assert samples(page, "kcp_etcd_voter") == {"": 1.0 if member else 0.0}, host
        assert samples(page, "kcp_membership_drift") == {"": 0.0}, host
        assert samples(page, "kcp_backup_interval_seconds") == {"": 900.0}
        assert samples(page, "kcp_backup_timer_active") == {"": 1.0 if member else 0.0}, host
        certs = samples(page, "kcp_certificate_expiry_timestamp_seconds")
        assert {f'{{path="/etc/etcd/pki/{c}.crt"}}' for c in ("ca", "server", "peer", "backup-client")} <= set(certs)
        assert all(v > time.time() + 300 * 86400 for v in certs.values()), certs
    newest = max(samples(p, "kcp_backup_last_snapshot_timestamp_seconds")[""] for p in pages.values())
    assert time.time() - newest < 900, "the snapshot just taken is the recovery point"
    # etcd's own metrics on 2381, with every etcd_* metric the rules use.
    etcd_page = metrics_of(sandbox, monitored.members[0], 2381)
    rules = monitoring.RULES.read_text()
    for name in ("etcd_server_has_leader", "etcd_server_proposals_failed_total", "etcd_mvcc_db_total_size_in_bytes",
                 "etcd_server_quota_backend_bytes"):
        assert name in rules and samples(etcd_page, name), name
    # A host in no role reaches neither port.
    for port in (2381, monitoring.AGENT_PORT):
        probe = sandbox.run_in_netns("outsider", ["curl", "-s", "--max-time", "3", "-o", "/dev/null",
                                                  f"http://{sandbox.address(monitored.members[0])}:{port}/metrics"])
        assert probe.returncode != 0, f"an outsider reached port {port}"


def test_prometheus_scrapes_every_host_and_the_cluster_is_quiet(monitored: Deployment, prometheus: Prometheus) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        return targets if len(targets) == 7 and all(t["health"] == "up" for t in targets) else None
    targets = wait_for("every target up", all_up, 60)
    assert sorted(t["labels"]["job"] for t in targets) == ["etcd"] * 3 + ["kcp"] * 4
    wait_for("the first rule evaluations", lambda: prometheus.query("kcp:backup_recovery_point_seconds"), 60)
    time.sleep(10)  # several evaluations, longer than every `for:`
    quiet = [a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["alerts"]]
    assert quiet == [], f"alerts on a healthy, freshly deployed cluster: {quiet}"
    rpo = prometheus.query("kcp:backup_recovery_point_seconds")[0]
    assert float(rpo["value"][1]) < 900, rpo


def test_stopping_the_backup_timers_fires_the_backup_alert_and_starting_them_resolves_it(
        monitored: Deployment, prometheus: Prometheus) -> None:
    sandbox = monitored.sandbox
    stopped = time.monotonic()
    for member in monitored.members:
        sandbox.ssh(member, "systemctl stop etcd-backup.timer")
    # Each member's next metrics run (every 30 s) reports the timer inactive; then the rule's `for:`.
    firing = wait_for("EtcdBackupNotScheduled firing for every member",
                      lambda: len(prometheus.firing("EtcdBackupNotScheduled")) == 3, 150)
    fired = time.monotonic() - stopped
    assert firing
    assert not prometheus.active("EtcdBackupNotScheduled", member=monitored.spares[0]), "a spare runs no backups"
    for member in monitored.members:
        sandbox.ssh(member, "systemctl start etcd-backup.timer")
    restarted = time.monotonic()
    wait_for("EtcdBackupNotScheduled resolved", lambda: not prometheus.active("EtcdBackupNotScheduled"), 150)
    log(f"backup timers stopped: EtcdBackupNotScheduled firing after {fired:.0f} s; "
        f"resolved {time.monotonic() - restarted:.0f} s after they started again")


def test_a_killed_member_fires_member_down_and_it_resolves_once_back(
        monitored: Deployment, prometheus: Prometheus) -> None:
    sandbox, victim = monitored.sandbox, monitored.members[-1]
    killed = time.monotonic()
    sandbox.kill_host(victim)
    wait_for(f"EtcdMemberDown firing for {victim}", lambda: prometheus.firing("EtcdMemberDown", member=victim), 120)
    fired = time.monotonic() - killed
    risk = wait_for("EtcdQuorumAtRisk firing", lambda: prometheus.firing("EtcdQuorumAtRisk"), 60)
    assert risk[0]["annotations"]["summary"].startswith("local: only 2 etcd members answer"), risk
    assert not prometheus.active("EtcdNoLeader"), "two members keep a leader"
    sandbox.start_host(victim)
    back = time.monotonic()
    wait_for("EtcdMemberDown resolved", lambda: not prometheus.active("EtcdMemberDown"), 180)
    resolved = time.monotonic() - back
    wait_for("EtcdQuorumAtRisk resolved", lambda: not prometheus.active("EtcdQuorumAtRisk"), 60)
    log(f"{victim} killed: EtcdMemberDown firing after {fired:.0f} s; resolved {resolved:.0f} s after its "
        "host started again")


def status(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/status on the stack; it asks every host at once and must leave no ssh control folder behind."""
    scratch = Path(tempfile.gettempdir())
    earlier = set(scratch.glob("kcp-restore-*"))
    proc = subprocess.run([str(ROOT / "scripts" / "status"), str(deployment.stack_file), *args], capture_output=True,
                          text=True, timeout=300, check=False)
    left = set(scratch.glob("kcp-restore-*")) - earlier
    assert not left, f"{shlex.join(['scripts/status', *args])} left its ssh control folders behind: {sorted(left)}"
    return proc


def test_status_shows_members_backups_and_certificates(monitored: Deployment) -> None:
    proc = status(monitored, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    members = {m["name"]: m for m in report["members"]}
    assert sorted(members) == sorted(monitored.members)
    assert all(m["role"] == "voter" and m["healthy"] and m["reachable"] for m in members.values()), members
    assert sum(m["leader"] for m in members.values()) == 1
    assert all(m["db_size"] > 0 and m["quota_percent"] < 1 and m["revision"] > 0 for m in members.values()), members
    assert report["spares"][0]["role"] == "not a member" and report["drift"] is None
    assert report["backups"]["last_snapshot"].startswith("local-") and report["backups"]["last_verified_at"]
    assert report["backups"]["destination"]["last_snapshot"] == report["backups"]["last_snapshot"]
    assert len(report["certificates"]) >= 4 * 4
    # Only a drill is missing on a new cluster.
    assert [a for a in report["attention"] if "DR drill" not in a] == [], report["attention"]
    # A drill's outcome, recorded on every etcd host, reaches the metrics.
    drill = monitored.workdir / "drill.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    drill.write_text(json.dumps({"ok": True, "snapshot": report["backups"]["last_snapshot"], "rpo_seconds": 312.4,
                                 "rto_seconds": 2.31, "finished_at": now}))
    recorded = status(monitored, "--record-drill", str(drill))
    assert recorded.returncode == 0, recorded.stderr
    collect(monitored, monitored.members[0])
    page = metrics_of(monitored.sandbox, monitored.members[0], monitoring.AGENT_PORT)
    assert samples(page, "kcp_drill_last_rto_seconds") == {"": 2.31}
    text = status(monitored)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "LAST DR DRILL:" in text.stdout and "RTO 2.31s" in text.stdout and "Nothing needs attention." in text.stdout


def test_a_takeover_fires_its_alert_and_status_shows_the_edit_that_adopts_it(
        monitored: Deployment, prometheus: Prometheus) -> None:
    sandbox, dead, spare = monitored.sandbox, monitored.members[-1], monitored.spares[0]
    sandbox.kill_host(dead)  # gone for good
    # The stack's delay (300 s) is too long for a test; a runtime drop-in shortens it on the spare only.
    sandbox.ssh(spare, "mkdir -p /run/systemd/system/etcd-spare-watch.service.d && printf '[Service]\\n"
                       "Environment=KCP_SPARE_TAKEOVER_AFTER_SECONDS=10\\n' > /run/systemd/system/"
                       "etcd-spare-watch.service.d/test.conf && systemctl daemon-reload")

    def taken_over() -> bool:
        if sandbox.ssh(spare, "test -e /var/lib/kcp/takeover.json", check=False).returncode == 0:
            return True
        sandbox.ssh(spare, "systemctl start etcd-spare-watch.service", check=False, timeout=600)
        return False
    wait_for("the spare's takeover", taken_over, 180, every=3)
    took = time.monotonic()
    alert = wait_for("EtcdSpareTookOver firing", lambda: prometheus.firing("EtcdSpareTookOver", member=spare), 120)
    assert alert[0]["labels"]["replaced"] == dead
    both = {"undeclared", "missing"}
    wait_for("EtcdMembershipDrift firing for both sides",
             lambda: {a["labels"]["state"] for a in prometheus.firing("EtcdMembershipDrift")} == both, 120)
    log(f"takeover of {dead} by {spare}: EtcdSpareTookOver firing {time.monotonic() - took:.0f} s after takeover.json")

    proc = status(monitored)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout
    log("scripts/status after the takeover:\n" + text)
    assert f"took over {dead}" in text and "NOT adopted" in text
    assert f"scripts/forget-host {monitored.stack_file} {dead}" in text
    assert f"-      - {{name: {dead}, " in text and f"+      - {{name: {spare}, " in text
    report = json.loads(status(monitored, "--json").stdout)
    adopt = report["drift"]["adopt"]
    assert adopt["forget"] == [dead] and adopt["invalid"] is None and adopt["spares"] == []
    assert [h["name"] for h in adopt["hosts"]] == [*monitored.members[:-1], spare]
    assert {m["name"] for m in report["cluster_members"]} == {*monitored.members[:-1], spare}
