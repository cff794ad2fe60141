"""The decision table of kcp_host/recovery.py (docs/self-healing.md), row by row.

The real agent (`kcp-host etcd-member-recovery`) runs with `--dry-run` against a stand-in etcdctl
that answers `member list` and `endpoint health` from files (JSON, as `-w json` prints them), so
each row is checked in milliseconds without etcd or root; the integration tests run the same
program against real members. The stand-in logs
every call, which shows that no decision changed membership.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.agent.hostscript_harness import PEER, Host, never_started, started, unstarted_learner


def recovery(host: Host, version: str = "3.5.16") -> subprocess.CompletedProcess[str]:
    return host.run("etcd-member-recovery", "--dry-run", version=version)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    if shutil.which("bash") is None:
        pytest.skip(reason="the stand-in etcdctl is a bash script: needs bash on PATH (install bash to run it)")
    return Host(tmp_path)


def decided(result: subprocess.CompletedProcess[str], rc: int, words: str) -> None:
    assert result.returncode == rc, f"rc {result.returncode}, stderr:\n{result.stderr}"
    assert words in result.stderr, result.stderr


def test_local_data_and_nobody_answering_starts_at_once(host: Host) -> None:
    decided(recovery(host.with_data().formed()), 0, "decision: start etcd (local data; no other member answered)")


def test_freshly_restored_data_starts_without_asking_the_other_members(host: Host) -> None:
    result = recovery(host.with_data().formed().restored())
    decided(result, 0, "decision: start etcd (data restored from a snapshot)")
    assert "member list" not in host.calls(), "a restored member waited for its peers"


def test_local_data_of_a_listed_member_starts(host: Host) -> None:
    result = recovery(host.with_data(member_id="a1").formed().peers(
        started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "local data of a current member")


def test_empty_data_and_nobody_answering_before_formation_bootstraps(host: Host) -> None:
    decided(recovery(host), 0, "decision: bootstrap a new cluster")


def test_empty_data_and_nobody_answering_after_formation_refuses(host: Host) -> None:
    decided(recovery(host.formed()), 3, "scripts/etcd-restore")


def test_late_bootstrap_member_joins_the_first_boot(host: Host) -> None:
    never_ran = never_started("a1", "h1")
    result = recovery(host.peers(never_ran, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "decision: bootstrap a new cluster")


def test_marker_wins_over_a_never_started_slot(host: Host) -> None:
    """Once formed, a slot that never ran is replaced as a learner, never bootstrapped."""
    never_ran = never_started("a1", "h1")
    result = recovery(host.formed().peers(never_ran, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "decision: replace this member (data: empty)")


def test_empty_data_with_quorum_replaces_the_member(host: Host) -> None:
    result = recovery(host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"),
                                 healthy=("h2", "h3")))
    decided(result, 0, "decision: replace this member (data: empty)")


def test_no_marker_but_a_started_slot_still_means_formed(host: Host) -> None:
    """A replacement machine that lost the marker must not bootstrap a second cluster."""
    result = recovery(host.peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "decision: replace this member (data: empty)")


def test_corrupt_db_with_quorum_replaces_the_member(host: Host) -> None:
    result = recovery(host.with_data(db_magic=0x12345678).formed().peers(
        started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "decision: replace this member (data: bad-db)")


def test_empty_data_without_quorum_refuses_and_names_the_restore(host: Host) -> None:
    result = recovery(host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"),
                                 healthy=("h2",)))
    decided(result, 3, "no quorum (1 of 3 voters healthy)")
    assert "scripts/etcd-restore" in result.stderr


def test_data_of_a_removed_member_whose_slot_a_spare_took_refuses(host: Host) -> None:
    result = recovery(host.with_data(member_id="a1").formed().peers(
        started("a2", "h2"), started("a3", "h3"), started("a4", "spare1"), healthy=("h2", "h3", "spare1")))
    decided(result, 4, "this slot was taken over")


def test_a_prepared_join_is_started_not_redone(host: Host) -> None:
    (host.root / "join.env").write_text(
        "ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER="
        + ",".join(f"{h}={PEER[h]}" for h in ("h1", "h2", "h3")) + "\n")
    learner = unstarted_learner("a9", "h1")
    result = recovery(host.formed().peers(learner, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "joining as a prepared learner")


def test_a_join_env_that_no_longer_matches_the_members_is_redone(host: Host) -> None:
    (host.root / "join.env").write_text(
        f"ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER=h1={PEER['h1']},h9=https://10.9.9.99:2380\n")
    learner = unstarted_learner("a9", "h1")
    result = recovery(host.formed().peers(learner, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 0, "decision: replace this member (data: empty)")


def test_a_host_the_stack_dropped_stays_stopped_even_with_its_data(host: Host) -> None:
    result = recovery(host.with_data(member_id="a1").formed().marked_removed("h1").peers(
        started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")))
    decided(result, 4, "the stack no longer lists h1")
    assert not (host.root / "state" / "not-a-member").exists(), "a dry run wrote the not-a-member note"


def test_a_removal_mark_of_another_host_changes_nothing(host: Host) -> None:
    result = recovery(host.with_data(member_id="a1").formed().marked_removed("h2").peers(
        started("a1", "h1"), started("a3", "h3"), healthy=("h3",)))
    decided(result, 0, "local data of a current member")


def test_etcdctl_without_learners_is_refused(host: Host) -> None:
    decided(recovery(host, version="3.3.27"), 2, "no learner support")


@pytest.mark.parametrize("case", ["replace", "refuse"])
def test_dry_run_never_changes_membership(host: Host, case: str) -> None:
    healthy = ("h2", "h3") if case == "replace" else ()
    recovery(host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=healthy))
    calls = host.calls()
    assert calls, "the stand-in etcdctl was never called"
    for verb in ("member add", "member remove", "member promote", " put ", " lock ", "lease grant"):
        assert verb not in calls, f"dry run called etcdctl {verb!r}:\n{calls}"
