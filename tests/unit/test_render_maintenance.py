"""Policies of the rendered maintenance job (kcp-host etcd-maintain) and of the etcd load balancer's check."""

from __future__ import annotations

import re

from components.render import etcd, loadbalancer, maintenance
from kcp_host.cli import SUBCOMMANDS

MEMBERS = (etcd.Member("h1", "10.0.0.11"), etcd.Member("h2", "10.0.0.12"), etcd.Member("h3", "10.0.0.13"))


def test_the_timer_runs_the_agent_every_4_hours_randomized() -> None:
    files = maintenance.maintenance_files()
    timer, service = files[maintenance.TIMER], files[maintenance.SERVICE]
    assert "OnCalendar=*-*-* 00/4:00:00\n" in timer and "RandomizedDelaySec=1h\n" in timer
    assert "Unit=etcd-maintain.service\n" in timer and "WantedBy=timers.target\n" in timer
    assert "ExecStart=/usr/local/lib/kcp/kcp-host etcd-maintain\n" in service and "etcd-maintain" in SUBCOMMANDS


def test_a_refusal_is_not_a_failure_but_a_full_quota_is() -> None:
    service = maintenance.service_unit()
    assert "Type=oneshot\n" in service and "SuccessExitStatus=3\n" in service
    assert "ConditionPathExists=/etc/etcd/cluster-formed\n" in service, "no run before the cluster formed"


def test_wherever_backups_are_scheduled_maintenance_is_too() -> None:
    """Clouds start only etcd-backup.timer at boot: its drop-in pulls the maintenance timer in."""
    drop_in = maintenance.maintenance_files()[maintenance.BACKUP_TIMER_DROP_IN]
    assert maintenance.BACKUP_TIMER_DROP_IN.startswith("/etc/systemd/system/etcd-backup.timer.d/")
    assert "[Unit]\nWants=etcd-maintain.timer\n" in drop_in


def test_bare_metal_enables_the_timer_on_every_member_once_etcd_is_healthy(declared) -> None:
    program = declared("local")
    names = [r.name for r in program.resources]
    for host in ("h1", "h2", "h3"):
        step = program.named(f"local-{host}-maintain-timer")
        assert "systemctl enable --now etcd-maintain.timer" in step.inputs["create"]
        assert names.index(step.name) > names.index("local-h1-etcd-healthy")


def _etcd_backend() -> str:
    config = loadbalancer.haproxy_config("10.0.0.100", MEMBERS, MEMBERS)
    return config.split("\nbackend etcd-members\n", 1)[1]


def _ms(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s)", value).groups()  # type: ignore[union-attr]
    return int(number) * (1000 if unit == "s" else 1)


def test_a_member_without_leader_or_quorum_is_out_of_the_etcd_backend_within_1s() -> None:
    backend = _etcd_backend()
    server = dict(re.findall(r"\b(inter|fastinter|downinter|fall|rise) (\w+)", backend))
    check = _ms(re.search(r"timeout check (\w+)", backend)[1])  # type: ignore[index]
    inter, fastinter, fall = _ms(server["inter"]), _ms(server["fastinter"]), int(server["fall"])
    # Worst case: the loss right after a good check, then `fall` failed checks that each wait for the timeout.
    assert inter + check + (fall - 1) * (fastinter + check) <= 1000
    assert fall >= 2, "one slow answer must not take a member out"
    assert "uri /health?exclude=NOSPACE" in backend and "serializable" not in backend, "a quorum read is checked"
    assert "on-marked-down shutdown-sessions" in backend and "option redispatch 1" in backend
