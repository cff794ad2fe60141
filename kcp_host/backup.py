"""etcd-backup: the backup timer's job, one verified snapshot per interval, taken by the raft leader.

Exit 0: done, or not the leader; 1: snapshot, verification or upload failed; 2: usage or configuration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kcp_host import verify
from kcp_host.contract import BackupEnv, ClusterEnv, load_env
from kcp_host.destinations import UploadError, destination
from kcp_host.etcd import Etcdctl, EtcdError, size_timeout, snapshot_status
from kcp_host.files import flocked, one_line, read_json, sha256_of, update_json, utc_iso, utc_stamp, write_json
from kcp_host.log import Abort, log


class Job:
    """One run: this host's settings, the backup certificate's etcdctl, the work dir's status.json."""

    def __init__(self, env: ClusterEnv, backup: BackupEnv, upload: bool) -> None:
        self.env, self.backup, self.upload = env, backup, upload
        self.ctl = Etcdctl.of(env, cert=backup.cert, key=backup.key)
        self.work = Path(backup.work_dir)
        self.status = self.work / "status.json"

    def fail(self, message: str) -> int:
        """Recorded at the destination too, so a failure is visible off-host."""
        reason = one_line(message)
        update_json(self.status, format=1, last_failure=utc_iso(), last_failure_reason=reason)
        if self.upload:
            try:
                destination(self.backup).report(self.status, f"{self.env.member_name}: {reason}")
            except (UploadError, OSError) as error:
                log(f"could not report the failure to {self.backup.dest}: {error}")
        log(f"FAILED: {reason}")
        return 1

    def run(self, any_member: bool) -> int:
        url = self.env.client_url
        stopped = Path(self.env.not_a_member_file)
        if stopped.is_file() and not any_member:
            # Its slot was taken over or the stack dropped it: the members take the snapshots.
            log(f"{self.env.member_name} is no member ({stopped.read_text().strip()}); no snapshot here")
            return 0
        try:
            status = self.ctl.json([url], "endpoint", "status", dial="3s", timeout="60s")[0]["Status"]
            leader, me = status["leader"], status["header"]["member_id"]
        except (EtcdError, LookupError, TypeError) as error:
            return self.fail(f"cannot read the status of the local member {url}: {error}")
        if leader != me and not any_member:
            log(f"{self.env.member_name} is not the leader (leader id {leader}); the leader takes the snapshot")
            return 0
        started = time.time()
        name = f"{self.env.cluster_name}-{utc_stamp(started)}"
        db, meta_path = self.work / f"{name}.db", self.work / f"{name}.json"
        try:
            slow = size_timeout(int(status.get("dbSize") or 0))
            self.ctl.run([url], "snapshot", "save", str(db), dial="3s", timeout=slow)
        except EtcdError as error:
            for path in (db, db.with_name(f"{db.name}.part")):
                path.unlink(missing_ok=True)
            return self.fail(f"snapshot save failed: {error}")
        try:  # what a restore must reproduce; `verified` and its companions are filled in by verification
            snap = snapshot_status(str(db))
            revision = int(snap["revision"])
            meta: dict[str, Any] = {
                "format": 1, "name": name, "cluster": self.env.cluster_name, "taken_at": utc_iso(started),
                "member": self.env.member_name, "etcd_version": str(status.get("version", "")), "revision": revision,
                "cluster_id": f"{int(status['header']['cluster_id']):016x}",  # in a bucket, names its delta log
                **verify.contents(self.ctl, url, revision, slow), "total_keys": snap["totalKey"],
                "snapshot_hash": snap["hash"], "size": snap["totalSize"],
                "snapshot_seconds": round(time.time() - started, 2), "sha256": sha256_of(db),
                "verified": None, "verified_at": None, "verify_seconds": None, "verify_error": ""}
        except (EtcdError, LookupError, ValueError) as error:
            return self.fail(f"cannot record what {name} holds: {error}")
        write_json(meta_path, meta)
        log(f"saved {db} (revision {revision}, {meta['keys']} keys, hashkv {meta['hashkv']})")
        verify_started = time.monotonic()
        try:
            verified = not self.backup.verify or verify.check_and_record(db, meta_path, self.backup, update=True)
        except Abort as error:  # no throwaway etcd could run here: the snapshot counts as not verified
            verify.record(meta_path, [str(error)], time.monotonic() - verify_started)
            verified = False
        meta = read_json(meta_path)
        if self.upload:
            try:
                destination(self.backup).store(db, meta_path, meta)
            except (UploadError, OSError) as error:
                log(str(error))
                if verified:  # else the backup host's refusal (it stored the snapshot as bad) is expected
                    return self.fail(f"upload of {name} to {self.backup.dest} failed")
        for old in self.work.glob(f"{self.env.cluster_name}-*"):  # the destination holds the history
            if old.suffix in (".db", ".json") and old.stem != name:
                old.unlink()
        if not verified:
            return self.fail(f"snapshot {name} failed verification: {meta.get('verify_error', '')}")
        now = utc_iso()
        verified_at: dict[str, Any] = {"last_verified": now} if self.backup.verify else {}
        update_json(self.status, format=1, last_snapshot=name, last_success=now, **verified_at)
        if self.upload:
            try:
                destination(self.backup).report(self.status)
            except (UploadError, OSError):
                log(f"FAILED: could not publish {self.status} to {self.backup.dest} (snapshot {name} itself is stored)")
                return 1
        log(f"OK: {name} stored at {self.backup.dest} in {time.time() - started:.2f}s")
        return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-backup", description=__doc__.splitlines()[0],
                                     epilog="Reads /etc/etcd/cluster.env and /etc/etcd/backup.env "
                                            "(override with KCP_CLUSTER_ENV, KCP_BACKUP_ENV).")
    parser.add_argument("--any-member", action="store_true",
                        help="take the snapshot even if this member is not the leader (manual runs)")
    parser.add_argument("--no-upload", action="store_true",
                        help="keep the snapshot in the work dir only (tests, disk-only runs)")
    args = parser.parse_args(argv)
    job = Job(load_env(ClusterEnv), load_env(BackupEnv), upload=not args.no_upload)
    with flocked(job.work / ".backup.lock", what="etcd-backup run"):  # the lock also makes the work dir
        job.work.chmod(0o700)
        return job.run(args.any_member)
