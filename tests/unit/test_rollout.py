"""Policies of what a stack change does to etcd, as a pull request's preview shows it: the membership
change with its quorum verdict, and the rollout steps in order with the fault tolerance left in each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.config import ClusterConfig
from components.rollout import membership_change, rollout_steps
from components.validation import load
from tests.program import ROOT
from tests.unit.test_report import stack_cfg, stack_raw

RACKS = ("rack-a", "rack-b", "rack-c")


def _local(*hosts: str, **sections: dict[str, Any]) -> ClusterConfig:
    """The local stack with these etcd hosts (default h1-h3; h4 and up take the racks in turn), and these
    settings merged into its sections."""
    raw = stack_raw("local")
    shipped = {h["name"]: h for h in raw["baremetal"]["hosts"]}
    names = hosts or tuple(shipped)
    raw["baremetal"]["hosts"] = [shipped.get(n) or {"name": n, "address": f"10.250.0.{20 + int(n[1:])}",
                                                    "zone": RACKS[(int(n[1:]) - 1) % 3]} for n in names]
    raw["etcd"]["members"] = raw["apiServers"]["count"] = len(names)
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values}
    return load(raw)


def _steps(section: str) -> list[str]:
    """The numbered steps in order, without their numbers (which must count up from 1)."""
    found = [re.match(r"(\d+)\. (.*)", line) for line in section.splitlines()]
    steps = [m for m in found if m]
    assert [int(m[1]) for m in steps] == list(range(1, len(steps) + 1)), section
    return [m[2] for m in steps]


def _readdressed(*hosts: int) -> ClusterConfig:
    raw = stack_raw("local")
    for i in hosts:
        raw["baremetal"]["hosts"][i]["address"] = f"10.250.0.{31 + i}"
    return load(raw)


# -- membership change ---------------------------------------------------------------

def test_replacing_two_of_three_members_at_once_puts_quorum_at_risk() -> None:
    change = membership_change(_readdressed(), _readdressed(1, 2))
    assert "- replaced: h2 (10.250.0.12, rack-b): address 10.250.0.12 -> 10.250.0.32 (new peer URL)" in change
    assert "- replaced: h3 (10.250.0.13, rack-c): address 10.250.0.13 -> 10.250.0.33 (new peer URL)" in change
    assert "**Quorum at risk**: 2 of 3 etcd members are replaced or removed at once; 1 left, quorum needs 2" in change


def test_replacing_one_member_is_safe() -> None:
    change = membership_change(_readdressed(), _readdressed(0))
    assert "- replaced: h1 (10.250.0.11, rack-a)" in change
    assert "Safe: 1 of 3 etcd member(s) replaced or removed at once; 2 left, quorum needs 2." in change


def test_shrinking_below_the_old_quorum_is_at_risk() -> None:
    old = stack_cfg("gce-example")
    new = stack_cfg("gce-example", resilience="minimal", etcd={"members": 1}, apiServers={"count": 1})
    change = membership_change(old, new)
    assert "- removed: prod-etcd-1 (europe-west1-c)" in change and "- removed: prod-etcd-2 (europe-west1-d)" in change
    assert "shrinks from 3 to 1 members, below the old quorum of 2" in change


def test_switching_disk_mode_replaces_every_member() -> None:
    etcd = stack_raw("gce-example")["etcd"]
    change = membership_change(stack_cfg("gce-example"), stack_cfg("gce-example", etcd={**etcd, "disk": "local"}))
    assert change.count("etcd.disk persistent -> local") == 3
    assert "3 of 3 etcd members are replaced or removed at once; 0 left" in change


def test_growing_and_unchanged_are_safe() -> None:
    old = stack_cfg("gce-example")
    grown = membership_change(old, stack_cfg("gce-example", etcd={**stack_raw("gce-example")["etcd"], "members": 5}))
    assert "- added: prod-etcd-3 (europe-west1-b)" in grown and "- added: prod-etcd-4 (europe-west1-c)" in grown
    assert "Safe: no member is removed or replaced" in grown
    assert "No member is added, removed or replaced." in membership_change(old, old)


def test_a_bare_metal_zone_is_a_label_that_replaces_no_member() -> None:
    old, raw = stack_cfg("local"), stack_raw("local")
    raw["zones"] = [*RACKS, "rack-d"]
    raw["baremetal"]["hosts"][1]["zone"] = "rack-d"
    new = load(raw)
    assert "No member is added, removed or replaced." in membership_change(old, new)
    assert _steps(rollout_steps(old, new)) == []


# -- rollout steps -------------------------------------------------------------------

@pytest.mark.parametrize(("hosts", "during"), [
    (("h1", "h2", "h3"), "2 of 3 voters up, tolerates 0 more failures"),
    (("h1", "h2", "h3", "h4", "h5"), "4 of 5 voters up, tolerates 1 more failure"),
])
def test_a_new_election_timeout_restarts_every_member_one_at_a_time_in_host_order(hosts: tuple[str, ...],
                                                                                   during: str) -> None:
    section = rollout_steps(_local(*hosts), _local(*hosts, etcd={"electionMs": 1200}))
    assert _steps(section) == [f"restart {h} (etcd.electionMs 1000 -> 1200): {during}" for h in hosts]
    low = during.split("tolerates ")[1]
    assert f"Lowest fault tolerance during the rollout: {low} (steps {', '.join(map(str, range(1, len(hosts) + 1)))})" \
        in section


def test_restarts_follow_the_stacks_host_order() -> None:
    steps = _steps(rollout_steps(_local(), _local("h3", "h1", "h2", etcd={"heartbeatMs": 150})))
    assert [s.split(" ")[1] for s in steps] == ["h3", "h1", "h2"]


def test_the_cloud_steps_come_from_the_slots_and_say_that_the_machines_take_them_by_refresh() -> None:
    etcd = stack_raw("gce-five")["etcd"]
    section = rollout_steps(stack_cfg("gce-five"), stack_cfg("gce-five", etcd={**etcd, "electionMs": 1500}))
    assert _steps(section) == [f"restart prod5-etcd-{i} (etcd.electionMs {etcd.get('electionMs', 1000)} -> 1500): "
                               "4 of 5 voters up, tolerates 1 more failure" for i in range(5)]
    assert "On gce the machines take these steps themselves" in section and "kcp-cloud-refresh" in section
    assert "recreate" not in section.replace("recreated member", ""), "no machine is recreated by hand"
    assert "Until the staying members remove them" not in section, "no member is dropped"


def test_a_cloud_shrink_counts_the_dropped_machines_down_until_their_members_are_removed() -> None:
    """The up deletes slots 3 and 4 with their machines; the staying members' watch removes their members after."""
    etcd = stack_raw("gce-five")["etcd"]
    section = rollout_steps(stack_cfg("gce-five"), stack_cfg("gce-five", etcd={**etcd, "members": 3}))
    assert _steps(section) == ["remove prod5-etcd-3: 4 voters remain, 3 up, tolerates 0 more failures",
                               "remove prod5-etcd-4: 3 voters remain, tolerates 1 more failure"]
    assert "Lowest fault tolerance during the rollout: 0 more failures (step 1)." in section
    assert "still voters: 3 of 5 up, tolerates 0 more failures" in section
    assert "`kcp-cloud-membership.timer` looks every 30 s" in section and "about a minute" in section


@pytest.mark.parametrize(("sections", "unrestarted"), [
    ({"backup": {"intervalMinutes": 30}}, "backup.intervalMinutes 15 -> 30"),
    ({"network": {"adminCidrs": ["10.250.0.0/16"]}}, "network.adminCidrs [10.250.0.0/24] -> [10.250.0.0/16]"),
    ({"baremetal": {"spareTakeoverAfterSeconds": 600}}, "baremetal.spareTakeoverAfterSeconds 300 -> 600"),
])
def test_settings_etcd_does_not_read_restart_no_member(sections: dict[str, Any], unrestarted: str) -> None:
    section = rollout_steps(_local(), _local(**sections))
    assert _steps(section) == []
    assert "No member restarts or changes." in section
    assert f"Changed without restarting any member: {unrestarted}." in section


def test_a_firewall_change_says_it_goes_host_by_host_and_refuses_a_lockout() -> None:
    section = rollout_steps(_local(), _local(baremetal={"operatorCidrs": ["10.250.0.0/16"]}))
    assert "a change that would lock out the machine running Pulumi is refused at the first host" in section
    assert "firewall" not in rollout_steps(_local(), _local(backup={"intervalMinutes": 30}))


def test_growing_from_three_to_five_adds_two_learners_one_at_a_time() -> None:
    assert _steps(rollout_steps(_local(), _local("h1", "h2", "h3", "h4", "h5"))) == [
        "add h4 as a learner, then promote it: 3 voters while it catches up (4 once promoted), "
        "tolerates 1 more failure",
        "add h5 as a learner, then promote it: 4 voters while it catches up (5 once promoted), "
        "tolerates 1 more failure",
    ]


def test_shrinking_from_five_to_three_removes_two_members_one_at_a_time() -> None:
    assert _steps(rollout_steps(_local("h1", "h2", "h3", "h4", "h5"), _local())) == [
        "remove h4: 4 voters remain, tolerates 1 more failure",
        "remove h5: 3 voters remain, tolerates 1 more failure",
    ]


def test_new_member_certificates_restart_every_member() -> None:
    assert _steps(rollout_steps(_local(), _local(pki={"rotation": 1}))) == [
        f"restart {h} (new member certificates: pki.rotation 0 -> 1): 2 of 3 voters up, tolerates 0 more failures"
        for h in ("h1", "h2", "h3")]


def test_adopting_a_spare_that_took_over_a_dead_member_restarts_no_healthy_member() -> None:
    h1, _, h3 = stack_raw("local")["baremetal"]["hosts"]
    spare = {"name": "spare1", "address": "10.250.0.14", "zone": "rack-b"}
    old = _local(baremetal={"spares": [spare]})
    new = _local(baremetal={"hosts": [h1, spare, h3], "spares": []})
    change = membership_change(old, new)
    assert "- adopted: spare1 (10.250.0.14, rack-b) moves from spares to hosts in place of h2" in change
    assert "- removed:" not in change and "- added:" not in change
    section = rollout_steps(old, new)
    assert _steps(section) == [] and "No member restarts or changes." in section
    # Adopted, the spare is a voter like any other: a restart reaches it in its turn.
    timed = _local(baremetal={"hosts": [h1, spare, h3], "spares": []}, etcd={"electionMs": 1200})
    assert [s.split(" ")[1] for s in _steps(rollout_steps(old, timed))] == ["h1", "spare1", "h3"]


def test_a_combined_change_removes_first_restarts_next_and_adds_last() -> None:
    five = ("h1", "h2", "h3", "h4", "h5")
    section = rollout_steps(_local(*five), _local("h1", "h2", "h3", "h4", "h6", etcd={"electionMs": 1200}))
    assert _steps(section) == [
        "remove h5: 4 voters remain, tolerates 1 more failure",
        *[f"restart {h} (etcd.electionMs 1000 -> 1200): 3 of 4 voters up, tolerates 0 more failures" for h in five[:4]],
        "add h6 as a learner, then promote it: 4 voters while it catches up (5 once promoted), "
        "tolerates 1 more failure",
    ]
    assert "Lowest fault tolerance during the rollout: 0 more failures (steps 2, 3, 4, 5)." in section


def test_restarting_three_members_after_one_was_swapped_out_loses_quorum_and_says_so() -> None:
    section = rollout_steps(_local(), _local("h1", "h2", "h6", etcd={"electionMs": 1200}))
    assert _steps(section)[1] == ("restart h1 (etcd.electionMs 1000 -> 1200): 1 of 2 voters up, **quorum lost**: "
                                  "writes stop until this step ends")
    assert "**Quorum is lost during steps 2, 3**" in section


def test_a_new_bare_metal_address_removes_the_member_first_and_adds_it_back_last() -> None:
    assert _steps(rollout_steps(_readdressed(), _readdressed(1))) == [
        "remove h2 (replaced: address 10.250.0.12 -> 10.250.0.32 (new peer URL)): 2 voters remain, "
        "tolerates 0 more failures",
        "add h2 back as a learner, then promote it: 2 voters while it catches up (3 once promoted), "
        "tolerates 0 more failures",
    ]


def test_a_cloud_rebuilds_replaced_members_one_at_a_time_in_their_turn() -> None:
    etcd = stack_raw("gce-example")["etcd"]
    steps = _steps(rollout_steps(stack_cfg("gce-example"), stack_cfg("gce-example", etcd={**etcd, "disk": "local"})))
    assert steps == [f"replace prod-etcd-{i} (etcd.disk persistent -> local; it rejoins as a learner): "
                     "2 voters while it rejoins, tolerates 0 more failures" for i in range(3)]


def test_a_renamed_cloud_cluster_is_a_new_cluster_not_a_rollout() -> None:
    section = rollout_steps(stack_cfg("gce-example"), stack_cfg("gce-example", clusterName="other"))
    assert "**No current member stays**" in section and _steps(section) == []


def test_scripts_report_prints_the_rollout_steps(tmp_path: Path) -> None:
    base = tmp_path / "Pulumi.local.yaml"
    base.write_text((ROOT / "stacks" / "Pulumi.local.yaml").read_text().replace("electionMs: 1000", "electionMs: 1200"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "report"), "local", "--old-config", str(base)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    section = done.stdout.split("\n## Rollout steps\n", 1)[1]
    assert "## etcd membership change\n\nNo member is added, removed or replaced." in done.stdout
    assert _steps(section) == [f"restart {h} (etcd.electionMs 1200 -> 1000): 2 of 3 voters up, "
                               "tolerates 0 more failures" for h in ("h1", "h2", "h3")]
    assert "Lowest fault tolerance during the rollout: 0 more failures (steps 1, 2, 3)." in section
