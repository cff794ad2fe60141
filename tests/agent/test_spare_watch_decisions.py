"""kcp-host etcd-spare-watch before it takes the replacement lock: when a spare waits,
when it refuses, and that it changes membership only under the lock.

Runs the real agent against the stand-in etcdctl of tests/agent/hostscript_harness.py,
which cannot take a lock: a spare that decides to take over ends with "could not take the
replacement lock" and must not have touched membership before that.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.agent.hostscript_harness import Host, started

MEMBERS = (started("a1", "h1"), started("a2", "h2"), started("a3", "h3"))


@pytest.fixture
def spare(tmp_path: Path) -> Host:
    if shutil.which("bash") is None:
        pytest.skip(reason="the stand-in etcdctl is a bash script: needs bash on PATH (install bash to run it)")
    return Host(tmp_path, name="spare1").formed()


def watch(host: Host, after: int = 300) -> subprocess.CompletedProcess[str]:
    return host.run("etcd-spare-watch", KCP_SPARE_TAKEOVER_AFTER_SECONDS=str(after))


def seen(host: Host) -> list[list[str]]:
    path = host.root / "state" / "spare-watch.seen"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def membership_calls(host: Host) -> list[str]:
    return [c for c in host.calls().splitlines() if any(v in c for v in ("member remove", "member add", " put "))]


def test_all_healthy_nothing_recorded(spare: Host) -> None:
    result = watch(spare.peers(*MEMBERS, healthy=("h1", "h2", "h3")))
    assert result.returncode == 0, result.stderr
    assert seen(spare) == []


def test_first_unhealthy_sighting_is_kept_across_runs_and_waits(spare: Host) -> None:
    spare.peers(*MEMBERS, healthy=("h2", "h3"))
    first = watch(spare)
    assert first.returncode == 0 and "not yet overdue" in first.stderr, first.stderr
    recorded = seen(spare)
    assert [row[0] for row in recorded] == ["a1"]
    assert watch(spare).returncode == 0
    assert seen(spare) == recorded, "the first sighting must not move forward"
    assert membership_calls(spare) == []


def test_a_member_healthy_again_is_forgotten(spare: Host) -> None:
    watch(spare.peers(*MEMBERS, healthy=("h2", "h3")))
    watch(spare.peers(*MEMBERS, healthy=("h1", "h2", "h3")))
    assert seen(spare) == []


def test_overdue_member_whose_removal_would_lose_quorum_is_left_alone(spare: Host) -> None:
    result = watch(spare.peers(*MEMBERS, healthy=("h3",)), after=0)
    assert result.returncode == 3, result.stderr
    assert "would lose quorum" in result.stderr
    assert membership_calls(spare) == []
    assert not (spare.root / "state" / "spare-takeover.intent").exists()


def test_overdue_member_is_taken_over_only_under_the_lock(spare: Host) -> None:
    result = watch(spare.peers(*MEMBERS, healthy=("h2", "h3")), after=0)
    assert result.returncode == 5, result.stderr
    assert "could not take the replacement lock" in result.stderr
    assert any(" lock " in f" {c} " for c in spare.calls().splitlines()), "it never asked for the lock"
    assert membership_calls(spare) == [], "membership changed outside the lock"
    intent = (spare.root / "state" / "spare-takeover.intent").read_text().split()
    assert intent[0] == "a1" and intent[2] == "h1", intent


def test_a_finished_takeover_is_not_repeated(spare: Host) -> None:
    (spare.root / "state").mkdir(exist_ok=True)
    (spare.root / "state" / "takeover.json").write_text("{}")
    result = watch(spare.peers(*MEMBERS, healthy=("h2", "h3")), after=0)
    assert result.returncode == 0, result.stderr
    assert "spare-watch.seen" not in {p.name for p in (spare.root / "state").iterdir()}
    assert membership_calls(spare) == []
    actions = (spare.root / "fake" / "systemctl").read_text().splitlines()
    assert "enable etcd.service" in actions and "start etcd.service" in actions, actions
