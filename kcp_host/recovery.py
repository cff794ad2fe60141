"""etcd-member-recovery: before every etcd start, decide whether this host starts on its own data,
bootstraps a new cluster, or replaces its old self as a learner.

Run as root by etcd.service (`ExecStartPre=+`). The decision table is docs/self-healing.md's.
Exit codes: 0 start etcd, 2 bad configuration, 3 no quorum (restore from a backup), 4 this slot
was taken over, 5 another replacement is in progress, 6 a healthy member already holds this
slot, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl
from kcp_host.files import utc_stamp, write_atomic
from kcp_host.lifecycle import config_fingerprint
from kcp_host.log import Abort, log
from kcp_host.membership import (
    ClusterView,
    data_dir_has_content,
    other_endpoints,
    quorum,
    refuse_without_learner_support,
    replacement_lock,
)

BBOLT_MAGIC = 0xED0CDAED
BBOLT_PAGE_SIZES = (4096, 16384, 65536)
PROMOTE_UNIT = "etcd-member-promote.service"
STAY_STOPPED = (4, 6)  # etcd.service's RestartPreventExitStatus: no restart loop on a host that is no member
RESTORE_HINT = "Restore from a backup with scripts/etcd-restore (docs/self-healing.md)"


def data_state(data_dir: str) -> str:
    """"ok", "empty" or "bad-REASON": cheap structural checks only, so a normal start stays fast."""
    root = Path(data_dir)
    if not data_dir_has_content(data_dir):
        return "empty"
    if not (root / "member").is_dir():
        return "bad-no-member-dir"
    wals = sorted((root / "member" / "wal").glob("*.wal"))
    if not wals:
        return "bad-no-wal"
    if any(w.stat().st_size == 0 for w in wals):
        return "bad-empty-wal"
    return "ok" if bbolt_meta_ok(root / "member" / "snap" / "db") else "bad-db"


def bbolt_meta_ok(db: Path) -> bool:
    """Either meta page (page 0, or page 1 at one of bbolt's page sizes) carries bbolt's magic."""
    try:
        with db.open("rb") as f:
            for offset in (0, *BBOLT_PAGE_SIZES):
                f.seek(offset + 16)
                word = f.read(4)
                if len(word) == 4 and struct.unpack("<I", word)[0] == BBOLT_MAGIC:
                    return True
    except OSError:
        return False
    return False


@dataclass
class Recovery:
    env: ClusterEnv
    view: ClusterView
    dry_run: bool

    # -- facts ------------------------------------------------------------------------
    def slot_state(self) -> str:
        """"absent", "unstarted-voter", "learner" or "started" for the first member in this slot."""
        slot = self.view.in_slot()
        if not slot:
            return "absent"
        if slot[0].learner:
            return "learner"
        return "started" if slot[0].started else "unstarted-voter"

    def removed_from_cluster(self) -> bool:
        """The local data belongs to a member no longer listed (recorded ID gone, or no slot at all)."""
        recorded = Path(self.env.member_id_file)
        if recorded.is_file() and recorded.read_text().strip():
            return self.view.by_id(int(recorded.read_text().strip(), 16)) is None
        return self.slot_state() == "absent"

    def prepared_join(self) -> bool:
        """A learner for this host was added and join.env written (by an earlier run or a spare's watch)
        and etcd never started on it; the member list still matches join.env."""
        join = Path(self.env.join_env)
        slot = self.view.in_slot()
        if not join.is_file() or len(slot) != 1 or not slot[0].learner or slot[0].started:
            return False
        wanted = next((line.partition("=")[2] for line in join.read_text().splitlines()
                       if line.startswith("ETCD_INITIAL_CLUSTER=")), "")
        want = sorted(entry.partition("=")[2] for entry in wanted.split(",") if entry)
        have = sorted(url for m in self.view.members for url in m.peer_urls)
        return bool(want) and want == have

    def cluster_formed(self) -> bool:
        """The marker file, or evidence: only a first bootstrap shows this slot as a never-started voter."""
        if Path(self.env.cluster_formed_file).exists():
            return True
        return bool(self.view.members) and self.slot_state() != "unstarted-voter"

    # -- actions ----------------------------------------------------------------------
    def start(self, why: str) -> None:
        log(f"decision: start etcd ({why})")
        if not self.dry_run:
            self.ensure_data_dir()
            self.record_start()
            trigger_promoter()

    def record_start(self) -> None:
        """What a rollout compares against (etcd-rolling-restart), and no reason left to stay stopped."""
        write_atomic(self.env.started_config_file, config_fingerprint(self.env) + "\n")
        Path(self.env.not_a_member_file).unlink(missing_ok=True)

    def bootstrap(self, data: str) -> None:
        """First bootstrap: all members start together with ETCD_INITIAL_CLUSTER_STATE=new from etcd.env."""
        log("decision: bootstrap a new cluster (no cluster-formed marker, no formed cluster answered)")
        if self.dry_run:
            return
        if data not in ("ok", "empty"):
            self.move_data_aside(data)
        Path(self.env.join_env).unlink(missing_ok=True)
        self.ensure_data_dir()
        self.record_start()
        trigger_promoter()

    def move_data_aside(self, reason: str) -> None:
        """Never delete a data dir: rename it."""
        if not data_dir_has_content(self.env.data_dir):
            return
        dest = f"{self.env.data_dir}.{reason}-{utc_stamp()}"
        os.rename(self.env.data_dir, dest)
        log(f"moved the data dir aside to {dest} ({reason})")

    def ensure_data_dir(self) -> None:
        """etcd runs as user etcd and may not be able to create its data dir after one was moved aside."""
        data = Path(self.env.data_dir)
        if data.is_dir():
            return
        data.parent.mkdir(parents=True, exist_ok=True)
        data.mkdir(mode=0o700)
        if _user_exists("etcd"):
            shutil.chown(data, "etcd", "etcd")

    # -- the decision table -------------------------------------------------------------
    def check_quorum_for_join(self) -> None:
        """Refuse, touching nothing, when the healthy voters (this slot excluded) are not a quorum."""
        self.view.probe_health()
        voters, healthy = self.view.count_voters()
        if voters == 0 or healthy < quorum(voters):
            raise Abort(3, f"the cluster has no quorum ({healthy} of {voters} voters healthy) and this member "
                           f"has no usable data; membership left unchanged. {RESTORE_HINT}")
        voters, _ = self.view.count_voters(m.id for m in self.view.in_slot())
        configured = len(self.env.members)
        if voters >= configured:
            raise Abort(4, f"the cluster already has {voters} voters besides this slot ({configured} configured): "
                           f"this slot was taken over (see {self.env.state_dir}/takeover.json on the spare); "
                           "update the stack configuration instead")

    def decide(self) -> None:
        data = data_state(self.env.data_dir)
        # Just restored from a snapshot: every member starts at once into a new logical cluster, so
        # probing the others would only wait. One-shot: later starts take the checks below.
        restored = Path(self.env.restored_file)
        if data == "ok" and restored.exists():
            if not self.dry_run:
                restored.unlink()
            return self.start("data restored from a snapshot")
        others = other_endpoints(self.env)
        if not self.view.fetch(others):
            if data == "ok":
                return self.start("local data; no other member answered")
            if Path(self.env.cluster_formed_file).exists():
                raise Abort(3, f"the cluster was formed, no other member answers and this member has no usable "
                               f"data ({data}); membership left unchanged. If the other members run, this host "
                               "cannot reach them yet (retried at every start); if they are lost, restore from a "
                               "backup with scripts/etcd-restore (docs/self-healing.md)")
            return self.bootstrap(data)
        if self.view.removed_by_stack(others):
            raise Abort(4, f"the stack no longer lists {self.env.member_name} (marked removed by "
                           "etcd-reconcile-members): etcd stays stopped until the stack lists this host again")
        if data == "ok":
            if not self.removed_from_cluster():
                return self.start("local data of a current member")
            log("the local data belongs to a member no longer in the cluster")
        if not self.cluster_formed():
            return self.bootstrap(data)
        if data == "empty" and self.prepared_join():
            return self.start("joining as a prepared learner")
        self.check_quorum_for_join()
        log(f"decision: replace this member (data: {data})")
        if self.dry_run:
            return None
        with replacement_lock(self.env, self.view.ctl, self.view.endpoints()):
            self.join_locked()
        return self.start("joining as a learner")

    def join_locked(self) -> None:
        """Under the lock; everything is re-read, since another host may have acted meanwhile."""
        data = data_state(self.env.data_dir)
        if not self.view.fetch(self.view.endpoints()):
            raise Abort(3, "no member answered under the lock")
        endpoints = self.view.endpoints()
        if data == "empty" and self.prepared_join():
            log("a prepared join for this host is in place")
            return
        self.check_quorum_for_join()
        if not self.view.remove_stale_learners(endpoints):
            raise Abort(5, "another replacement is in progress; retrying at the next start")
        removed: list[int] = []
        for member in self.view.in_slot():
            if self.view.healthy.get(member.id):
                raise Abort(6, f"member {member.hex_id} holding this slot is healthy; another host runs as "
                               f"'{self.env.member_name}'?")
            if not self.view.safe_to_remove(member, removed):
                raise Abort(3, f"removing member {member.hex_id} would lose quorum; membership left unchanged")
            self.view.remove(endpoints, member, "stale member in this host's slot")
            removed.append(member.id)
        self.move_data_aside("removed" if data in ("ok", "empty") else data)
        self.view.join_as_learner(endpoints)


def trigger_promoter() -> None:
    """etcd-member-promote.service (ordered after etcd) records the member ID and promotes a learner."""
    if not Path("/run/systemd/system").is_dir():
        return
    if not systemd.has_unit(PROMOTE_UNIT):
        log(f"warning: {PROMOTE_UNIT} is not installed")
        return
    if systemd.systemctl("start", "--no-block", PROMOTE_UNIT).returncode != 0:
        log(f"warning: could not queue {PROMOTE_UNIT}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-member-recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    ctl = Etcdctl.of(env)
    refuse_without_learner_support(ctl)
    # ExecStartPre: this host's etcd is not running; no need to probe it.
    try:
        Recovery(env, ClusterView(env, ctl, self_down=True), args.dry_run).decide()
    except Abort as stop:
        if stop.code in STAY_STOPPED and not args.dry_run:
            write_atomic(env.not_a_member_file, f"{stop}\n")
        raise
    return 0
