"""The DR drill, run the way CI runs it: newest verified backup onto the local test hosts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.figures import record
from tests.integration.conftest import Deployment
from tests.integration.test_backup_restore import SSH_OPTIONS, load_keys, pause_backup_timers, run_backup_everywhere
from tests.program import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def backups_on_demand(local_cluster: Deployment) -> None:
    """The drill must restore the backup this module took, not one a timer slot added meanwhile."""
    pause_backup_timers(local_cluster)


def test_drill_rebuilds_the_cluster_from_the_newest_backup_and_reports_rpo_and_rto(local_cluster: Deployment) -> None:
    dep = local_cluster
    load_keys(dep, dep.members[0], 2_000, "/drill/")
    meta = run_backup_everywhere(dep)
    dep.etcdctl(dep.members[0], "put", "/drill/after-backup", "x")
    hosts = ",".join(f"{m}={dep.sandbox.address(m)}" for m in dep.members)
    argv = [sys.executable, str(ROOT / "scripts" / "dr-drill"), "--stack", str(dep.stack_file), *SSH_OPTIONS,
            "--hosts", hosts, "--force", "--sample", "50"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"\n{proc.stderr.strip().splitlines()[-1]}")
    assert report["ok"] is True and report["snapshot"] == meta["name"]
    assert report["checks"]["key_count"]["found"] == meta["keys"]
    assert report["checks"]["sample"] == {"ok": True, "asked": 50, "read": 50, "newer_than_snapshot": 0}
    assert report["rpo_seconds"] >= 0 and 0 < report["rto_seconds"] <= report["total_seconds"]
    record("DR drill RTO (newest verified backup onto 3 members)", report["rto_seconds"],
           "the whole drill (pick, restore, checks)", report["total_seconds"])
    assert proc.stderr.strip().splitlines()[-1].startswith("dr-drill OK:"), "one-line summary missing"
    gone = dep.etcdctl(dep.members[1], "get", "/drill/after-backup").stdout.strip()
    assert not gone, "the drill cluster holds a write made after the backup"


def test_drill_fails_loudly_when_no_verified_backup_exists(local_cluster: Deployment) -> None:
    dep = local_cluster
    argv = [sys.executable, str(ROOT / "scripts" / "dr-drill"), "--stack", str(dep.stack_file), *SSH_OPTIONS,
            "--backup-path", "/srv/etcd-backups/no-such-cluster", "--force"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1 and "FAILED" in proc.stderr, proc.stderr
