"""The decision table of scripts/host/etcd-member-recovery (docs/self-healing.md), row by row.

The real program runs with `--dry-run` against a stand-in etcdctl that answers `member list`
and `endpoint health` from files, so each row is checked in milliseconds without etcd or
root; the integration tests run the same program against real members. The stand-in logs
every call, which shows that no decision changed membership.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

RECOVERY = Path(__file__).resolve().parents[2] / "scripts" / "host" / "etcd-member-recovery"

FAKE_ETCDCTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/calls"
ep=""
for a in "$@"; do case $a in --endpoints=*) ep=${a#--endpoints=} ;; esac; done
case " $* " in
*" member list "*) [[ -f $FAKE_DIR/members ]] && cat "$FAKE_DIR/members" ;;
*" endpoint health "*) grep -qxF "$ep" "$FAKE_DIR/healthy" 2>/dev/null ;;
*" version "*) printf 'etcdctl version: %s\nAPI version: 3.4\n' "${FAKE_VERSION:-3.4.23}" ;;
*) exit 1 ;;
esac
"""

PEER = {h: f"https://10.9.9.1{i}:2380" for i, h in enumerate(["h1", "h2", "h3", "spare1"], 1)}
CLIENT = {h: f"https://10.9.9.1{i}:2379" for i, h in enumerate(["h1", "h2", "h3", "spare1"], 1)}
BBOLT_MAGIC = 0xED0CDAED


def started(member_id: str, name: str) -> str:
    return f"{member_id}, started, {name}, {PEER[name]}, {CLIENT[name]}, false"


@dataclass
class Host:
    """h1's files, a stand-in etcdctl, and what the other members answer."""

    root: Path

    def __post_init__(self) -> None:
        (self.root / "fake").mkdir()
        etcdctl = self.root / "etcdctl"
        etcdctl.write_text(FAKE_ETCDCTL)
        etcdctl.chmod(0o755)
        members = " ".join(f"{h}={PEER[h]}" for h in ("h1", "h2", "h3"))
        (self.root / "cluster.env").write_text("\n".join([
            "KCP_CLUSTER_NAME=t", "KCP_MEMBER_NAME=h1", f"KCP_PEER_URL={PEER['h1']}",
            f"KCP_CLIENT_URL={CLIENT['h1']}", f'KCP_MEMBERS="{members}"',
            "KCP_CLIENT_ENDPOINTS=" + ",".join(CLIENT[h] for h in ("h1", "h2", "h3")),
            "KCP_ETCD_CA=/nonexistent/ca.crt", "KCP_ETCD_CERT=/nonexistent/c.crt", "KCP_ETCD_KEY=/nonexistent/c.key",
            f"KCP_DATA_DIR={self.data}", f"KCP_JOIN_ENV={self.root / 'join.env'}",
            f"KCP_CLUSTER_FORMED_FILE={self.root / 'cluster-formed'}", f"KCP_STATE_DIR={self.root / 'state'}",
            f"KCP_ETCDCTL={etcdctl}", "",
        ]))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def with_data(self, db_magic: int = BBOLT_MAGIC, member_id: str | None = None) -> Host:
        (self.data / "member" / "wal").mkdir(parents=True)
        (self.data / "member" / "snap").mkdir()
        (self.data / "member" / "wal" / "0000000000000000-0000000000000000.wal").write_bytes(b"\0" * 64)
        page = bytes(16) + struct.pack("<I", db_magic)
        (self.data / "member" / "snap" / "db").write_bytes(page.ljust(8192, b"\0"))
        if member_id:
            (self.data / "member" / "kcp-member-id").write_text(member_id + "\n")
        return self

    def formed(self) -> Host:
        (self.root / "cluster-formed").write_text("")
        return self

    def peers(self, *lines: str, healthy: tuple[str, ...] = ()) -> Host:
        (self.root / "fake" / "members").write_text("".join(f"{line}\n" for line in lines))
        (self.root / "fake" / "healthy").write_text("".join(f"{CLIENT[h]}\n" for h in healthy))
        return self

    def run(self, version: str = "3.4.23") -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "KCP_CLUSTER_ENV": str(self.root / "cluster.env"),
               "FAKE_DIR": str(self.root / "fake"), "FAKE_VERSION": version}
        return subprocess.run([str(RECOVERY), "--dry-run"], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    def calls(self) -> str:
        path = self.root / "fake" / "calls"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    if shutil.which("bash") is None or shutil.which("od") is None:
        pytest.skip("needs bash and od")
    return Host(tmp_path)


def decided(result: subprocess.CompletedProcess[str], rc: int, words: str) -> None:
    assert result.returncode == rc, f"rc {result.returncode}, stderr:\n{result.stderr}"
    assert words in result.stderr, result.stderr


def test_local_data_and_nobody_answering_starts_at_once(host: Host) -> None:
    decided(host.with_data().formed().run(), 0, "decision: start etcd (local data; no other member answered)")


def test_local_data_of_a_listed_member_starts(host: Host) -> None:
    result = host.with_data(member_id="a1").formed().peers(
        started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "local data of a current member")


def test_empty_data_and_nobody_answering_before_formation_bootstraps(host: Host) -> None:
    decided(host.run(), 0, "decision: bootstrap a new cluster")


def test_empty_data_and_nobody_answering_after_formation_refuses(host: Host) -> None:
    decided(host.formed().run(), 3, "scripts/etcd-restore")


def test_late_bootstrap_member_joins_the_first_boot(host: Host) -> None:
    never_ran = f"a1, started, h1, {PEER['h1']}, , false"
    result = host.peers(never_ran, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "decision: bootstrap a new cluster")


def test_marker_wins_over_a_never_started_slot(host: Host) -> None:
    """Once formed, a slot that never ran is replaced as a learner, never bootstrapped."""
    never_ran = f"a1, started, h1, {PEER['h1']}, , false"
    result = host.formed().peers(never_ran, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "decision: replace this member (data: empty)")


def test_empty_data_with_quorum_replaces_the_member(host: Host) -> None:
    result = host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"),
                                 healthy=("h2", "h3")).run()
    decided(result, 0, "decision: replace this member (data: empty)")


def test_no_marker_but_a_started_slot_still_means_formed(host: Host) -> None:
    """A replacement machine that lost the marker must not bootstrap a second cluster."""
    result = host.peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "decision: replace this member (data: empty)")


def test_corrupt_db_with_quorum_replaces_the_member(host: Host) -> None:
    result = host.with_data(db_magic=0x12345678).formed().peers(
        started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "decision: replace this member (data: bad-db)")


def test_empty_data_without_quorum_refuses_and_names_the_restore(host: Host) -> None:
    result = host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"),
                                 healthy=("h2",)).run()
    decided(result, 3, "no quorum (1 of 3 voters healthy)")
    assert "scripts/etcd-restore" in result.stderr


def test_data_of_a_removed_member_whose_slot_a_spare_took_refuses(host: Host) -> None:
    result = host.with_data(member_id="a1").formed().peers(
        started("a2", "h2"), started("a3", "h3"), started("a4", "spare1"), healthy=("h2", "h3", "spare1")).run()
    decided(result, 4, "this slot was taken over")


def test_a_prepared_join_is_started_not_redone(host: Host) -> None:
    (host.root / "join.env").write_text(
        "ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER="
        + ",".join(f"{h}={PEER[h]}" for h in ("h1", "h2", "h3")) + "\n")
    learner = f"a9, unstarted, , {PEER['h1']}, , true"
    result = host.formed().peers(learner, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "joining as a prepared learner")


def test_a_join_env_that_no_longer_matches_the_members_is_redone(host: Host) -> None:
    (host.root / "join.env").write_text(
        f"ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER=h1={PEER['h1']},h9=https://10.9.9.99:2380\n")
    learner = f"a9, unstarted, , {PEER['h1']}, , true"
    result = host.formed().peers(learner, started("a2", "h2"), started("a3", "h3"), healthy=("h2", "h3")).run()
    decided(result, 0, "decision: replace this member (data: empty)")


def test_etcdctl_without_learners_is_refused(host: Host) -> None:
    decided(host.run(version="3.3.27"), 2, "no learner support")


@pytest.mark.parametrize("case", ["replace", "refuse"])
def test_dry_run_never_changes_membership(host: Host, case: str) -> None:
    healthy = ("h2", "h3") if case == "replace" else ()
    host.formed().peers(started("a1", "h1"), started("a2", "h2"), started("a3", "h3"), healthy=healthy).run()
    calls = host.calls()
    assert calls, "the stand-in etcdctl was never called"
    for verb in ("member add", "member remove", "member promote", " put ", " lock ", "lease grant"):
        assert verb not in calls, f"dry run called etcdctl {verb!r}:\n{calls}"
