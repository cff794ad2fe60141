"""Policies for the self-healing units: what runs where, when, and within which limits."""

from __future__ import annotations

import configparser

import pytest

from components.render import recovery
from kcp_host.cli import SUBCOMMANDS


def _unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_spare_watch_files_are_the_service_and_timer_in_systemds_directory():
    files = recovery.spare_watch_files(300, 30)
    assert set(files) == {
        "/etc/systemd/system/etcd-spare-watch.service",
        "/etc/systemd/system/etcd-spare-watch.timer",
    }


def test_spare_watch_service_passes_the_takeover_delay_to_the_program():
    service = _unit(recovery.spare_watch_files(420, 30)[recovery.SPARE_SERVICE])
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == "/usr/local/lib/kcp/kcp-host etcd-spare-watch"
    assert service["Service"]["Environment"] == "KCP_SPARE_TAKEOVER_AFTER_SECONDS=420"


def test_spare_watch_service_is_bounded_and_outlasts_lock_wait_plus_etcd_start():
    service = _unit(recovery.spare_watch_service(300))
    limit = int(service["Service"]["TimeoutStartSec"])
    assert 90 + 300 <= limit <= 900, f"TimeoutStartSec={limit}"


def test_spare_watch_timer_runs_every_interval_without_overlapping_runs():
    timer = _unit(recovery.spare_watch_files(300, 15)[recovery.SPARE_TIMER])
    assert timer["Timer"]["OnUnitInactiveSec"] == "15"
    assert timer["Timer"]["OnBootSec"] == "15"
    assert "OnCalendar" not in timer["Timer"], "a wall-clock schedule would fire on every spare at once"
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.parametrize(("after", "interval"), [(59, 30), (30, 30), (0, 30), (300, 0), (300, 4), (-1, 5)])
def test_spare_watch_rejects_a_takeover_sooner_than_two_checks_or_bad_numbers(after, interval):
    with pytest.raises(ValueError, match="not allowed"):
        recovery.spare_watch_files(after, interval)


def test_spare_watch_rejects_non_integers():
    with pytest.raises(ValueError, match="not allowed"):
        recovery.spare_watch_files(True, 30)  # type: ignore[arg-type]


def test_promote_unit_waits_for_etcd_and_stops_with_it():
    unit = _unit(recovery.member_recovery_files()[recovery.PROMOTE_SERVICE])
    assert unit["Unit"]["After"] == "etcd.service"
    assert unit["Unit"]["PartOf"] == "etcd.service"
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["ExecStart"] == "/usr/local/lib/kcp/kcp-host etcd-member-promote"


def test_promote_unit_is_not_enabled_on_its_own():
    """etcd-member-recovery queues it before every etcd start; an [Install] would start it at boot alone."""
    assert "[Install]" not in recovery.promote_unit()


def test_promote_unit_limit_exceeds_the_programs_own_deadline():
    unit = _unit(recovery.promote_unit(120))
    assert unit["Service"]["Environment"] == "KCP_PROMOTE_TIMEOUT_SECONDS=120"
    assert int(unit["Service"]["TimeoutStartSec"]) > 120


def test_promote_unit_rejects_a_timeout_too_short_to_catch_up():
    with pytest.raises(ValueError, match="not allowed"):
        recovery.promote_unit(5)


@pytest.mark.parametrize("subcommand", ["etcd-member-promote", "etcd-spare-watch"])
def test_every_subcommand_the_units_start_exists_in_the_agent(subcommand):
    assert subcommand in SUBCOMMANDS
    texts = [*recovery.member_recovery_files().values(), *recovery.spare_watch_files(300, 30).values()]
    assert any(f"/usr/local/lib/kcp/kcp-host {subcommand}\n" in t for t in texts), f"no unit starts {subcommand}"


def test_recovery_queues_the_rendered_promote_unit_by_name():
    from kcp_host import recovery as agent_recovery

    assert recovery.PROMOTE_SERVICE.rsplit("/", 1)[1] == agent_recovery.PROMOTE_UNIT
