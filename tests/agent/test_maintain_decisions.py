"""`kcp-host etcd-maintain` against a stand-in etcdctl: which members it defragments, in which order,
when it refuses, what the quota watch says, and the NOSPACE recovery's steps."""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kcp_host.contract import BackupEnv, render_env
from kcp_host.maintain import MIB, Node, defrag_order, quota_bytes
from tests.agent.hostscript_harness import CLIENT, Host, started

# Answers from files in FAKE_DIR (`status_<url>.json`, `defragged_<url>.json` after a defrag, `alarms`,
# `down`: members that answer nothing) and logs every call to FAKE_DIR/calls. Bash, not Python: it runs
# about 30 times per test.
FAKE_ETCDCTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/calls"
eps=""
for a in "$@"; do case $a in --endpoints=*) eps=${a#--endpoints=} ;; esac; done
up=""
IFS=, read -ra list <<<"$eps"
for e in "${list[@]}"; do grep -qxF "$e" "$FAKE_DIR/down" || { up=$e; break; }; done
f() { printf '%s/%s_%s.json' "$FAKE_DIR" "$1" "${up//[^a-zA-Z0-9]/_}"; }
case " $* " in *" version "*) echo "etcdctl version: 3.5.16"; exit 0 ;; esac
[[ -n $up ]] || { echo "context deadline exceeded" >&2; exit 1; }
case " $* " in
*" member list "*) cat "$FAKE_DIR/members.json" ;;
*" endpoint status "*) cat "$(f status)" ;;
*" alarm list "*) sed 's/^/memberID:1 alarm:/' "$FAKE_DIR/alarms" ;;
*" alarm disarm "*) : >"$FAKE_DIR/alarms" ;;
*" defrag "*) cp "$(f defragged)" "$(f status)" ;;
*" compact "*) ;;
*" put "*) if [[ -s $FAKE_DIR/alarms ]]; then echo "mvcc: database space exceeded" >&2; exit 1; fi
           touch "$FAKE_DIR/probe" ;;
*" get kcp/maintenance/probe -w json "*) if [[ -e $FAKE_DIR/probe ]]; then echo '{"kvs":[{}]}'; else echo '{}'; fi ;;
*" get "*) ;;
*" del "*) rm -f "$FAKE_DIR/probe" ;;
*) exit 1 ;;
esac
"""

IDS = {"h1": "a1", "h2": "b2", "h3": "c3"}


def status(size_mib: float, in_use_mib: float) -> dict[str, int]:
    return {"dbSize": int(size_mib * MIB), "dbSizeInUse": int(in_use_mib * MIB)}


class Maintained(Host):
    """An etcd host (h1 unless told) with the maintenance stand-in and its own backup work dir."""

    def __post_init__(self) -> None:
        super().__post_init__()
        (self.root / "etcdctl").write_text(FAKE_ETCDCTL)
        self.work = self.root / "backup-work"
        (self.root / "backup.env").write_text(render_env(BackupEnv(
            dest="ssh://u@10.9.9.20/srv/x", cert="/nonexistent/b.crt", key="/nonexistent/b.key",
            work_dir=str(self.work)), "unit-test host"))
        self.cluster()

    def cluster(self, leader: str = "h1", sizes: dict[str, dict[str, int]] | None = None,
                down: tuple[str, ...] = (), alarms: tuple[str, ...] = ()) -> Maintained:
        fake = self.root / "fake"
        self.peers(*(started(IDS[h], h) for h in IDS))
        for h, size in (sizes or {h: status(100, 90) for h in IDS}).items():
            for kind, answer in (("status", size), ("defragged", {**size, "dbSize": size["dbSizeInUse"]})):
                header = {"member_id": int(IDS[h], 16), "revision": 4242}
                entry = {"Endpoint": CLIENT[h], "Status": {"header": header, "leader": int(IDS[leader], 16), **answer}}
                (fake / f"{kind}_{re.sub('[^a-zA-Z0-9]', '_', CLIENT[h])}.json").write_text(json.dumps([entry]))
        (fake / "down").write_text("".join(f"{CLIENT[h]}\n" for h in down))
        (fake / "alarms").write_text("".join(f"{a}\n" for a in alarms))
        return self

    def maintain(self, *args: str) -> Any:
        return self.run("etcd-maintain", "--quota-backend-bytes", str(1024 * MIB), "--backup-wait", "0", *args,
                        KCP_BACKUP_ENV=str(self.root / "backup.env"))

    def defragmented(self) -> list[str]:
        """Members defragmented, in order."""
        names = {url: h for h, url in CLIENT.items()}
        return [names[line.split("--endpoints=", 1)[1].split()[0]]
                for line in self.calls().splitlines() if line.endswith(" defrag")]

    def alarms(self) -> list[str]:
        return (self.root / "fake" / "alarms").read_text().split()


@pytest.fixture
def host(tmp_path: Path) -> Maintained:
    return Maintained(tmp_path)


def node(name: str, size_mib: float, in_use_mib: float, leader: bool = False) -> Node:
    return Node(name, CLIENT[name], int(size_mib * MIB), int(in_use_mib * MIB), leader, 1)


def test_followers_first_by_name_and_the_leader_last() -> None:
    nodes = [node("h1", 100, 10, leader=True), node("h3", 100, 10), node("h2", 100, 10)]
    assert [n.name for n in defrag_order(nodes)] == ["h2", "h3", "h1"]


def test_only_members_with_enough_free_pages_are_due() -> None:
    nodes = [node("h1", 1000, 600, leader=True),  # 40% and 400 MiB free: due
             node("h2", 1000, 750),  # 25% free: below the share
             node("h3", 100, 50)]  # 50% but only 50 MiB free: below the floor
    assert [n.name for n in defrag_order(nodes, 30, 64)] == ["h1"]


def test_the_leader_defragments_due_members_followers_first(host: Maintained) -> None:
    host.cluster(leader="h1", sizes={"h1": status(500, 100), "h2": status(500, 100), "h3": status(500, 100)})
    proc = host.maintain()
    assert proc.returncode == 0, proc.stderr
    assert host.defragmented() == ["h2", "h3", "h1"]
    assert "every voter healthy again" in proc.stderr


def test_below_the_threshold_nothing_is_defragmented(host: Maintained) -> None:
    host.cluster(sizes={"h1": status(500, 400), "h2": status(500, 450), "h3": status(80, 20)})
    proc = host.maintain()
    assert proc.returncode == 0, proc.stderr
    assert host.defragmented() == [] and "no defragmentation" in proc.stderr


def test_a_follower_leaves_defragmentation_to_the_leader(host: Maintained) -> None:
    host.cluster(leader="h3", sizes={h: status(500, 100) for h in IDS})
    proc = host.maintain()
    assert proc.returncode == 0, proc.stderr
    assert host.defragmented() == [] and "not the leader" in proc.stderr


def test_refused_while_a_voter_is_unhealthy(host: Maintained) -> None:
    host.cluster(sizes={h: status(500, 100) for h in IDS}, down=("h3",))
    for args in ((), ("--defrag",)):
        proc = host.maintain(*args)
        assert proc.returncode == 3, proc.stderr
        assert "h3" in proc.stderr
    assert host.defragmented() == []


def test_refused_while_a_backup_runs(host: Maintained) -> None:
    host.cluster(sizes={h: status(500, 100) for h in IDS})
    host.work.mkdir()
    with open(host.work / ".backup.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = host.maintain("--defrag")
    assert proc.returncode == 3, proc.stderr
    assert "a backup is running" in proc.stderr and host.defragmented() == []


def test_quota_watch_warns_at_80_percent_and_fails_at_95(host: Maintained) -> None:
    host.cluster(leader="h2", sizes={"h1": status(850, 840), "h2": status(100, 90), "h3": status(100, 90)})
    warned = host.maintain()
    assert warned.returncode == 0 and "WARNING: database of h1 is 850.0 MiB, 83% of the quota" in warned.stderr
    host.cluster(leader="h2", sizes={"h1": status(980, 970), "h2": status(100, 90), "h3": status(100, 90)})
    failed = host.maintain()
    assert failed.returncode == 1 and "ERROR: database of h1" in failed.stderr


def test_an_alarm_stops_scheduled_defragmentation_and_fails_the_unit(host: Maintained) -> None:
    host.cluster(sizes={h: status(500, 100) for h in IDS}, alarms=("NOSPACE",))
    proc = host.maintain()
    assert proc.returncode == 1 and "--nospace" in proc.stderr
    assert host.defragmented() == []


def test_nospace_recovery_compacts_defragments_disarms_and_writes(host: Maintained) -> None:
    host.cluster(leader="h3", sizes={h: status(1020, 200) for h in IDS}, alarms=("NOSPACE",))
    proc = host.maintain("--nospace")
    assert proc.returncode == 0, proc.stderr
    calls = host.calls()
    assert "compact 4242 --physical" in calls
    assert host.defragmented() == ["h1", "h2", "h3"]
    assert calls.index(" defrag") < calls.index("alarm disarm") < calls.index("put kcp/maintenance/probe")
    assert host.alarms() == [] and not (host.root / "fake" / "probe").exists()
    assert "OK: NOSPACE cleared" in proc.stderr


def test_nospace_recovery_keeps_the_alarm_when_the_live_data_does_not_fit(host: Maintained) -> None:
    host.cluster(sizes={h: status(1020, 1000) for h in IDS}, alarms=("NOSPACE",))
    proc = host.maintain("--nospace")
    assert proc.returncode == 1 and "does not fit" in proc.stderr
    assert "alarm disarm" not in host.calls() and host.alarms() == ["NOSPACE"]


def test_a_corrupt_alarm_is_never_disarmed(host: Maintained) -> None:
    host.cluster(alarms=("CORRUPT", "NOSPACE"))
    proc = host.maintain("--nospace")
    assert proc.returncode == 1 and "CORRUPT" in proc.stderr
    assert "disarm" not in host.calls() and host.defragmented() == []


def test_quota_is_read_from_etcd_env(tmp_path: Path) -> None:
    (tmp_path / "etcd.env").write_text("ETCD_NAME=h1\nETCD_QUOTA_BACKEND_BYTES=8589934592\n")
    assert quota_bytes(str(tmp_path / "etcd.env")) == 8 * 1024**3
    (tmp_path / "etcd.env").write_text("ETCD_NAME=h1\n")
    assert quota_bytes(str(tmp_path / "etcd.env")) == 2 * 1024**3, "etcd's default"
