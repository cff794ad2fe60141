"""Policies of the resilience report (a stack output, and what `scripts/report` prints)."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pulumi
import pytest

from components.config import ClusterConfig
from components.report import resilience_report
from components.validation import load
from tests.conftest import ALL_STACKS, stack_for_tests
from tests.program import ROOT, run_program, stack_config


def stack_raw(stack: str) -> dict[str, Any]:
    return copy.deepcopy(stack_config(ROOT / "stacks" / f"Pulumi.{stack}.yaml"))


def stack_cfg(stack: str, **overrides: Any) -> ClusterConfig:
    return load(stack_raw(stack) | overrides)


def _table(report: str, heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under `## heading`, keyed by the header cells."""
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def _rows(report: str, prefix: str) -> dict[str, dict[str, str]]:
    return {r["failure domain"]: r for r in _table(report, "Failure domains") if r["failure domain"].startswith(prefix)}


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_every_shipped_stack_has_a_report_with_its_quorum(stack: str) -> None:
    cfg = stack_cfg(stack)
    report = resilience_report(cfg)
    members = cfg.etcd.members
    assert f"# Resilience report: {cfg.cluster_name} ({cfg.target}" in report
    assert f"etcd: {members} member(s), quorum {members // 2 + 1}, fault tolerance {(members - 1) // 2}" in report
    assert f"Snapshots every {cfg.backup.interval_minutes} min" in report
    assert f"RPO target: {cfg.backup.delta_seconds} s + 2 s" in report, "every target has the delta log"
    assert "```mermaid\nflowchart TB" in report


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_every_shipped_stack_survives_the_loss_of_any_one_zone(stack: str) -> None:
    report = resilience_report(stack_cfg(stack))
    zones = _rows(report, "zone ")
    assert len(zones) == 3, stack
    for name, row in zones.items():
        assert row["control plane"] == "survives", f"{stack}: {name}: {row}"
    assert "Any one zone of" in report and "Zone loss is NOT survived" not in report


def test_gce_example_keeps_two_of_three_members_when_a_zone_is_lost() -> None:
    zones = _rows(resilience_report(stack_cfg("gce-example")), "zone ")
    assert set(zones) == {"zone europe-west1-b", "zone europe-west1-c", "zone europe-west1-d"}
    for row in zones.values():
        assert row["runs"] == "etcd x1, apiserver x1"
        assert row["left after its loss: etcd / API"] == "2 / 2"


def test_a_single_zone_stack_says_that_zone_loss_is_not_survived() -> None:
    report = resilience_report(stack_cfg("gce-example", zones=["europe-west1-b"]))
    assert "**Zone loss is NOT survived**: this stack has one zone (europe-west1-b)" in report
    zone = _rows(report, "zone ")["zone europe-west1-b"]
    assert zone["left after its loss: etcd / API"] == "0 / 0"
    assert zone["control plane"] == "**STOPS**: etcd quorum lost (0 of 3 left, 2 needed); no API server left"
    machines = _rows(report, "machine ")
    assert len(machines) == 6 and all(r["control plane"] == "survives" for r in machines.values())


def test_five_members_keep_quorum_through_two_losses_but_not_three() -> None:
    rows = _table(resilience_report(stack_cfg("gce-five")), "etcd members lost at once")
    assert [r["members left"] for r in rows] == ["4", "3", "2", "1", "0"]
    assert [r["quorum (needs 3)"] == "kept" for r in rows] == [True, True, False, False, False]
    assert "the data went with the machines" in rows[2]["quorum (needs 3)"]


def test_persistent_disks_bring_quorum_back_without_a_restore() -> None:
    rows = _table(resilience_report(stack_cfg("gce-example")), "etcd members lost at once")
    assert "re-attach their disks (no data lost)" in rows[1]["quorum (needs 2)"]


def test_a_minimal_stack_says_which_single_failures_it_no_longer_survives() -> None:
    cfg = stack_cfg("gce-example", resilience="minimal", etcd={"members": 1}, apiServers={"count": 1})
    report = resilience_report(cfg)
    given_up = report.split("## resilience: minimal: what this stack no longer survives\n", 1)[1].split("\n## ")[0]
    assert "- the loss of prod-etcd-0 (etcd): etcd quorum lost (0 of 1 left, 1 needed)" in given_up
    assert "- the loss of prod-api-0 (apiserver): no API server left" in given_up
    assert "- the loss of zone europe-west1-b:" in given_up
    assert "Any one machine: **NOT survived**: losing prod-etcd-0, prod-api-0" in report


def test_a_default_stack_has_no_minimal_section() -> None:
    assert "resilience: minimal" not in resilience_report(stack_cfg("gce-example")).split("\n", 1)[1]


def test_bare_metal_counts_load_balancers_and_names_the_backup_host() -> None:
    raw = stack_for_tests(ROOT / "stacks" / "Pulumi.local.yaml", Path("/nonexistent/key"))
    report = resilience_report(load(raw))
    header = "left after its loss: etcd / API / LBs"
    assert _rows(report, "machine ")["machine h1 (10.250.0.11, rack-a)"][header] == "2 / 2 / 2"
    assert _rows(report, "backup host")["backup host 10.250.0.20"]["control plane"].startswith("survives; backups fail")
    assert "a spare takes over a dead etcd member after 300 s" in report


def test_a_bare_metal_zone_holding_every_load_balancer_is_fatal() -> None:
    """Validation refuses this layout unless resilience is minimal; the report still says why."""
    raw = stack_raw("local")
    raw["resilience"] = "minimal"
    for host in raw["baremetal"]["hosts"][1:]:
        host["roles"] = ["etcd", "apiserver"]
    raw["baremetal"]["hosts"].append({"name": "lb2", "address": "10.250.0.15", "zone": "rack-a",
                                      "roles": ["loadbalancer"]})
    report = resilience_report(load(raw))
    assert _rows(report, "zone ")["zone rack-a"]["control plane"] == \
        "**STOPS**: no load balancer left to hold the API VIP"
    assert "**Zone loss is NOT survived**: losing zone rack-a stops the control plane" in report


@pytest.mark.parametrize(("stack", "expected"), [
    ("local", ["keepalived VIP 10.250.0.100:6443", "HTTPS `GET /readyz`", "`balance source`",
               "`GET /health` on port 2381"]),
    ("gce-example", ["external TCP load balancer on port 6443", "regional managed instance group",
                     "autoheal", "internal TCP load balancer on port 2379 with session affinity CLIENT_IP"]),
    ("aws-example", ["health check type ELB", "HTTPS `GET /readyz` (NLB target group)",
                     "NLB on port 2379 with source-IP stickiness", "`GET /health` on port 2381"]),
])
def test_the_load_balancer_design_is_stated_per_target(stack: str, expected: list[str]) -> None:
    design = resilience_report(stack_cfg(stack)).split("## Load balancers and health checks\n", 1)[1].split("\n## ")[0]
    for phrase in expected:
        assert phrase in design, f"{stack}: '{phrase}' missing from the LB design"


def test_a_stale_or_failed_backup_is_called_out() -> None:
    status = {"last_snapshot": "prod-20260101T000000Z", "last_success": "2026-01-01T00:00:05Z",
              "last_verified": "2026-01-01T00:00:05Z", "last_failure": "2026-01-01T01:30:00Z",
              "last_failure_reason": "no leader"}
    report = resilience_report(stack_cfg("gce-example"), status, datetime(2026, 1, 1, 1, 40, tzinfo=UTC))
    assert "Last verified snapshot: 2026-01-01T00:00:05Z (99 min ago) (prod-20260101T000000Z)." in report
    assert "**Stale**: the newest verified snapshot is older than two intervals (60 min)" in report
    assert "**Last run failed** at 2026-01-01T01:30:00Z (10 min ago): no leader." in report


def test_a_fresh_backup_is_not_stale_and_no_status_states_no_time() -> None:
    status = {"last_snapshot": "s", "last_success": "2026-01-01T01:30:00Z", "last_verified": "2026-01-01T01:30:00Z"}
    fresh = resilience_report(stack_cfg("gce-example"), status, datetime(2026, 1, 1, 1, 40, tzinfo=UTC))
    assert "(10 min ago)" in fresh and "Stale" not in fresh and "Last run failed" not in fresh
    assert "min ago" not in resilience_report(stack_cfg("gce-example"))


def test_the_delta_logs_newest_archived_revision_is_reported_on_every_target() -> None:
    status = {"last_snapshot": "s", "last_success": "2026-01-01T01:30:00Z", "last_verified": "2026-01-01T01:30:00Z",
              "last_delta_revision": 4242, "last_delta_at": "2026-01-01T01:39:00Z"}
    now = datetime(2026, 1, 1, 1, 40, tzinfo=UTC)
    report = resilience_report(stack_cfg("local"), status, now)
    assert "- Delta log archived through revision 4242 as of 2026-01-01T01:39:00Z (1 min ago)." in report
    assert "every revision written, shipped by the raft leader every 10 s (backup.deltaSeconds)" in report
    assert "nothing archived yet" in resilience_report(stack_cfg("local"), {k: status[k] for k in list(status)[:3]},
                                                       now)
    cloud = resilience_report(stack_cfg("gce-example"), status, now)
    assert "- Delta log archived through revision 4242" in cloud and "to the backup bucket (deltas/<cluster ID>/)" \
        in cloud and "RPO target: 10 s + 2 s" in cloud


def test_the_diagram_draws_every_member_in_its_zone() -> None:
    report = resilience_report(stack_cfg("gce-five"))
    diagram = report.split("```mermaid\n", 1)[1].split("```", 1)[0]
    for i, zone in enumerate(["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-a", "us-central1-b"]):
        block = diagram.split(f'subgraph zone_{zone.replace("-", "_")}["zone {zone}"]', 1)[1].split("  end", 1)[0]
        assert f'etcd_prod5_etcd_{i}[("prod5-etcd-{i}: etcd")]' in block
    assert "-.->|leader snapshots every 30 min| backups" in diagram


def test_the_report_is_a_stack_output(throwaway_ssh_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.__setitem__(name, value))
    raw = stack_for_tests(ROOT / "stacks" / "Pulumi.local.yaml", throwaway_ssh_key)
    run_program(raw, stack="local")
    assert exported["resilienceReport"] == resilience_report(load(raw))


def test_scripts_report_runs_offline_for_the_local_stack() -> None:
    done = subprocess.run([str(ROOT / "scripts" / "report"), "local"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Resilience report: local (baremetal, resilience: default)")


def test_scripts_report_adds_the_membership_change_and_refuses_a_bad_config(tmp_path: Path) -> None:
    base = tmp_path / "Pulumi.local.yaml"
    base.write_text((ROOT / "stacks" / "Pulumi.local.yaml").read_text().replace("10.250.0.12", "10.250.0.42"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "report"), "local", "--old-config", str(base)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "- replaced: h2 (10.250.0.42, rack-b): address 10.250.0.42 -> 10.250.0.12" in done.stdout
    base.write_text(base.read_text().replace("members: 3", "members: 2"))
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "report"), "local", "--old-config", str(base)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "config key 'etcd.members': value 2 is not allowed" in bad.stderr
