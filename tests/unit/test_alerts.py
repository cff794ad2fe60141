"""The alert rules (monitoring/alerts.yml): promtool's own tests of every alert, their documentation, the metrics
they use, and how Prometheus reaches those metrics (units, firewall, the monitoring range)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import ConfigError
from components.facts import cluster_facts
from components.render import firewall, hostfiles, monitoring
from components.render.etcd import Member
from components.stack_file import read_stack
from components.targets import cloud
from components.topology import plan
from components.validation import load
from kcp_host import metrics
from kcp_host.cli import SUBCOMMANDS
from tests.program import ROOT, stack_config

RULES = yaml.safe_load(monitoring.RULES.read_text())
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}
TEST_FILES = sorted(monitoring.RULES.parent.glob("*_test.yml"))
DOC = (ROOT / "docs" / "alerts.md").read_text()
NO_PROMTOOL = "no promtool (Debian's prometheus package); runs once scripts/install-deps (as root) has installed it"
promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)


@promtool
def test_promtool_accepts_the_rules() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(monitoring.RULES)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@promtool
def test_promtool_unit_tests_pass() -> None:
    proc = subprocess.run(["promtool", "test", "rules", *map(str, TEST_FILES)], capture_output=True, text=True,
                          timeout=300, check=False, cwd=monitoring.RULES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(TEST_FILES)


def _expectations() -> list[dict[str, Any]]:
    return [case for path in TEST_FILES for test in yaml.safe_load(path.read_text())["tests"]
            for case in test.get("alert_rule_test", [])]


def test_every_alert_fires_in_a_promtool_test_and_stays_quiet_in_another() -> None:
    fired = {case["alertname"] for case in _expectations() if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in _expectations() if not case.get("exp_alerts")}
    assert set(ALERTS) <= fired, f"alerts no promtool test sees firing: {sorted(set(ALERTS) - fired)}"
    assert set(ALERTS) <= quiet, f"alerts no promtool test sees quiet: {sorted(set(ALERTS) - quiet)}"
    assert {case["alertname"] for case in _expectations()} <= set(ALERTS), "a test of an alert that does not exist"


def test_every_alert_has_its_entry_in_docs_alerts_md_and_a_runbook_link_to_it() -> None:
    headings = re.findall(r"^### (\w+)$", DOC, re.MULTILINE)
    assert sorted(headings) == sorted(ALERTS), "docs/alerts.md has one `### Name` section per alert"
    for name, rule in ALERTS.items():
        assert rule["annotations"]["runbook"] == f"docs/alerts.md#{name.lower()}", name
        section = DOC.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "**Means**" in section and "**Do**" in section, f"{name}: say what it means and what to do"
        assert rule["labels"]["severity"] in ("warning", "critical")


def _sample_facts() -> dict[str, Any]:
    """Every section of the agent's facts filled in, so every metric it can export is exported."""
    return {
        "cluster": "c", "host": "h1", "peer_url": "https://10.0.0.11:2380", "time": 1000.0, "formed_at": 10.0,
        "not_a_member": None,
        "membership": {"members": [], "voter": True, "undeclared": [{"name": "s", "peer_url": "u", "learner": False}],
                       "missing": []},
        "backup": {"interval_seconds": 900, "timer_active": True, "last_success": 1.0, "last_snapshot_taken": 1.0,
                   "last_verified": 1.0, "last_failure": None, "verification_failed": False, "delta_seconds": 10,
                   "last_delta": 2.0, "last_delta_revision": 42},
        "takeover": {"replaced": {"name": "h3", "member_id": "1"}, "at": 5.0, "adopted": False},
        "drill": {"finished_at": 1.0, "rto_seconds": 2.0, "rpo_seconds": 3.0, "last_success": 1.0},
        "restore": {"finished_at": 1.0, "rto_seconds": 2.0, "rpo_seconds": 3.0},
        "certificates": [{"path": "/etc/etcd/pki/ca.crt", "not_after": 9.0}],
    }


def _exported() -> set[str]:
    return {line.split()[2] for line in metrics.exposition(_sample_facts()).splitlines() if line.startswith("# TYPE")}


def test_the_rules_use_only_metrics_the_agent_or_etcd_exports_and_docs_list_every_agent_metric() -> None:
    used = set(re.findall(r"\b(kcp_[a-z_]+)\b", monitoring.RULES.read_text()))
    assert used <= _exported(), f"rules on metrics nobody exports: {sorted(used - _exported())}"
    for name in _exported():
        assert f"`{name}`" in DOC, f"docs/alerts.md does not describe {name}"
    # etcd's own: checked against a real etcd's /metrics by tests/integration/test_monitoring.py.
    assert set(re.findall(r"\b(etcd_[a-z_]+)\b", monitoring.RULES.read_text())) == {
        "etcd_server_has_leader", "etcd_server_proposals_failed_total", "etcd_mvcc_db_total_size_in_bytes",
        "etcd_server_quota_backend_bytes"}


def test_delta_metrics_only_where_the_delta_log_runs() -> None:
    """Where backup.env has no delta log (KCP_BACKUP_DELTA_SECONDS=0), no delta metric: EtcdDeltaArchiverBehind cannot
    fire there."""
    facts = _sample_facts()
    assert "kcp_delta_last_archived_timestamp_seconds 2\n" in metrics.exposition(facts)
    facts["backup"] |= {"delta_seconds": 0, "last_delta": None, "last_delta_revision": None}
    assert "kcp_delta" not in metrics.exposition(facts)


def test_units_write_the_file_every_30_s_and_serve_it_without_privileges() -> None:
    files = monitoring.monitoring_files(15)
    service, timer, http = files[monitoring.SERVICE], files[monitoring.TIMER], files[monitoring.HTTP_SERVICE]
    assert "ExecStart=/usr/local/lib/kcp/kcp-host metrics --backup-interval-seconds 900\n" in service
    assert "Type=oneshot\n" in service and "StateDirectory=kcp/metrics\n" in service
    assert "OnUnitActiveSec=30s\n" in timer and "Unit=kcp-metrics.service\n" in timer
    assert "ExecStart=/usr/local/lib/kcp/kcp-host metrics --serve\n" in http
    assert "DynamicUser=yes\n" in http and "CapabilityBoundingSet=\n" in http and "Restart=always\n" in http
    assert "metrics" in SUBCOMMANDS
    # Clouds start only the backup timer at boot: it pulls the metrics units in.
    assert files[monitoring.BACKUP_TIMER_DROP_IN].endswith("[Unit]\nWants=kcp-metrics.timer kcp-metrics-http.service\n")
    assert monitoring.BACKUP_TIMER_DROP_IN.startswith("/etc/systemd/system/etcd-backup.timer.d/")


@pytest.mark.parametrize("stack", ["gce-example", "aws-five"])
def test_every_cloud_members_bundle_carries_the_units_and_still_fits_a_secret(stack: str) -> None:
    cfg = read_stack(ROOT / "stacks" / f"Pulumi.{stack}.yaml")
    topology = plan(cfg)
    addresses = {m.name: f"10.0.0.{10 + i}" for i, m in enumerate(topology.etcd_members)}
    cluster = cluster_facts(cfg, topology, addresses, "203.0.113.10", f"gs://b/{cfg.cluster_name}/backups")
    creds = hostfiles.Credentials(
        ca_certs={"etcd-ca": "CA", "kubernetes-ca": "CA", "front-proxy-ca": "CA"},
        certs=defaultdict(lambda: ("CERT", "KEY")), kubernetes_ca_key="K", service_account_key="K",
        service_account_public="P", encryption_key_b64="E")
    slot = cloud.slots(cfg, topology)[0]
    files = {f.path: f.content for f in cloud.slot_files(cfg, cluster, slot, creds)}
    assert monitoring.monitoring_files(cfg.backup.interval_minutes).items() <= files.items()
    cloud.checked_bundle(slot.name, list(cloud.slot_files(cfg, cluster, slot, creds)))


def test_bare_metal_enables_the_units_on_members_and_spares_once_formed(declared) -> None:
    program = declared("local")
    names = [r.name for r in program.resources]
    for host in ("h1", "h2", "h3", "spare1"):
        step = program.named(f"local-{host}-metrics")
        assert step.inputs["create"].startswith(
            "systemctl daemon-reload && systemctl enable kcp-metrics.timer kcp-metrics-http.service && "
            "systemctl restart kcp-metrics.timer kcp-metrics-http.service  # units ")
        assert names.index(step.name) > names.index(f"local-{host}-etcd-formed")


def test_a_change_of_the_backup_interval_leaves_the_enable_step_alone() -> None:
    """The oneshot service carries the interval and reads it on every run; only the timer or server restart."""
    assert monitoring.enable_command() == monitoring.enable_command()
    assert monitoring.monitoring_files(15)[monitoring.SERVICE] != monitoring.monitoring_files(30)[monitoring.SERVICE]


def _peers(monitoring_ranges: tuple[str, ...]) -> firewall.FirewallPeers:
    return firewall.FirewallPeers(("10.0.0.0/24",), (), ("10.0.0.11",), ("10.0.0.11",), ("10.0.0.11",),
                                  ("10.0.0.20",), ("10.0.0.11",), monitoring_ranges)


def test_the_firewall_opens_both_metrics_ports_to_the_monitoring_ranges_only() -> None:
    rules = firewall.nftables_config(_peers(("192.0.2.0/24",)))
    assert "tcp dport { 2381, 2382 } ip saddr @monitoring accept" in rules
    assert re.search(r"set monitoring \{[^}]*elements = \{ 192\.0\.2\.0/24 \}", rules)
    closed = firewall.nftables_config(_peers(()))
    assert re.search(r"set monitoring \{\s*type ipv4_addr\s*flags interval\s*auto-merge\s*\}", closed), \
        "no monitoring range by default: the set is empty"
    assert "2382" not in closed.replace("tcp dport { 2381, 2382 } ip saddr @monitoring accept", "")


NO_NFT = "needs nft and a private network namespace (unshare -n, root); runs as root once install-deps ran"
NFT_MISSING = shutil.which("nft") is None or shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0


@pytest.mark.skipif(NFT_MISSING, reason=NO_NFT)
def test_nft_accepts_the_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.nft").write_text(firewall.nftables_config(_peers(("192.0.2.0/24", "198.51.100.7/32"))))
    proc = subprocess.run(["unshare", "-n", "nft", "-c", "-f", str(tmp_path / "rules.nft")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def _local(**baremetal: Any) -> dict[str, Any]:
    cfg = stack_config(ROOT / "stacks" / "Pulumi.local.yaml")
    cfg["baremetal"].update(baremetal)
    return cfg


def test_monitoring_cidrs_default_to_none_and_must_be_canonical_ranges() -> None:
    assert load(_local()).baremetal.monitoring_cidrs == []  # type: ignore[union-attr]
    assert load(_local(monitoringCidrs=["10.9.0.0/16"])).baremetal.monitoring_cidrs == ["10.9.0.0/16"]  # type: ignore[union-attr]
    for bad in ("10.9.0.1/16", "everyone", "::/0"):
        with pytest.raises(ConfigError, match=r"baremetal\.monitoringCidrs\[0\]"):
            load(_local(monitoringCidrs=[bad]))
    declared = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]["baremetal"]["description"]
    assert "monitoringCidrs: []" in declared and "monitoringCidrs" in (ROOT / "README.md").read_text()


def test_scrape_config_labels_every_target_and_leaves_spares_out_of_the_etcd_job() -> None:
    jobs = monitoring.scrape_config("prod", [Member("h1", "10.0.0.11")], [Member("s1", "10.0.0.14")])
    assert [j["job_name"] for j in jobs] == ["etcd", "kcp"]
    assert jobs[0]["static_configs"] == [{"targets": ["10.0.0.11:2381"], "labels": {"cluster": "prod", "member": "h1"}}]
    assert [c["targets"] for c in jobs[1]["static_configs"]] == [["10.0.0.11:2382"], ["10.0.0.14:2382"]]
