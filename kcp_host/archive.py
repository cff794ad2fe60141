"""etcd-delta-archive: the delta log, so a restore loses seconds of writes, not a backup interval.

Runs on every etcd host; only the raft leader's acts. It watches etcd from the revision after the last archived
one (the destination says which: the backup host's `delta-next`, a bucket's newest chunk) and ships every
`KCP_BACKUP_DELTA_SECONDS` a chunk of the revisions seen (kcp_host/deltalog.py). The backup host refuses a chunk
that would leave a gap or repeat a revision, a bucket a second chunk from one revision, so after a leader change,
or two archivers for a moment, the chain stays whole: a refused archiver asks again where to resume. In a bucket
each etcd cluster (a restore makes a new one) has its own log, `deltas/<cluster ID>/`. It also compacts etcd
(kube-apiserver's own compaction is off) every 5 minutes to the revision of 5 minutes before, never past what is
archived or held by a kept snapshot. docs/backups.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kcp_host import deltalog, systemd, verify
from kcp_host.contract import BackupEnv, ClusterEnv, load_env
from kcp_host.destinations import DeltaRefused, UploadError, destination
from kcp_host.etcd import Etcdctl, EtcdError, command_env
from kcp_host.files import update_json, utc_iso
from kcp_host.log import Abort, log

COMPACT_EVERY_SECONDS = 300  # what kube-apiserver's --etcd-compaction-interval does by default, done here instead
CHECK_SHARE = 10  # the hashkv check at a chunk's close reads the whole database: at most 1/10 of the time
RETRY_SECONDS = 5
SNAPSHOT_ASK_SECONDS = 300


class Resync(Exception):
    """Stop watching and ask the backup host again where the chain goes on."""

    def __init__(self, message: str, compacted_from: int = 0) -> None:
        super().__init__(message)
        self.compacted_from = compacted_from  # the watch's start revision, when etcd no longer holds it


class Watch:
    """`etcdctl watch` of the whole keyspace from a revision, its responses read by a thread into a queue."""

    def __init__(self, ctl: Etcdctl, endpoint: str, start: int) -> None:
        argv = ctl.argv([endpoint], "watch", "--prefix", "", f"--rev={start}", "-w", "json", timeout="0s")
        self.proc = subprocess.Popen([a for a in argv if a != "--command-timeout=0s"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=command_env())
        self.responses: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                self.responses.put((time.time(), json.loads(line)))
            except ValueError:
                continue
        self.responses.put(None)

    def error(self) -> str:
        self.proc.wait(timeout=10)
        return (self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else "")[-300:]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def revisions_of(seen_at: float, response: dict[str, Any]) -> list[deltalog.Revision]:
    """One watch response's events, a Revision per mod_revision, in order."""
    by_revision: dict[int, list[dict[str, Any]]] = {}
    for event in response.get("Events") or ():
        by_revision.setdefault(int(event["kv"]["mod_revision"]), []).append(event)
    return [deltalog.Revision(rev, seen_at, deltalog.ops_of(events)) for rev, events in sorted(by_revision.items())]


def compaction_target(seen: Iterable[tuple[float, int]], now: float, archived: int, snapshots: Iterable[int]) -> int:
    """The revision current 5 minutes ago (`seen`: (time, revision) samples), but never past both the archived
    revision and the newest kept snapshot's: a restore needs the revisions after one of them. 0: nothing yet."""
    aged = max((revision for at, revision in seen if at <= now - COMPACT_EVERY_SECONDS), default=0)
    return min(aged, max(archived, *snapshots, 0))


class Archiver:
    def __init__(self, env: ClusterEnv, backup: BackupEnv) -> None:
        self.env, self.backup = env, backup
        self.ctl = Etcdctl.of(env, cert=backup.cert, key=backup.key)
        self.sink = destination(backup)
        self.history = ""  # the etcd cluster's ID (16 hex digits), which names its log in a bucket
        self.status = Path(backup.work_dir) / "status.json"
        self.archived = 0  # the last revision the backup host took
        self.snapshot_revisions: list[int] = []
        self.leases: dict[int, int] = {}  # granted TTL by lease ID, read once per lease
        self.check_cost, self.checked_at = 0.0, 0.0
        self.revisions_seen: collections.deque[tuple[float, int]] = collections.deque()
        self.compacted_at = time.monotonic()
        self.lost = 0  # revisions up to here are compacted away before they were archived: a new segment follows
        self.asked_at = -float(SNAPSHOT_ASK_SECONDS)

    def local_status(self) -> tuple[bool, int]:
        """(this member leads, the cluster's revision), and the cluster's ID into `history`; EtcdError when the local
        member does not answer."""
        try:
            status = self.ctl.json([self.env.client_url], "endpoint", "status", dial="2s", timeout="5s")[0]["Status"]
            self.history = f"{int(status['header']['cluster_id']):016x}"
            return status["leader"] == status["header"]["member_id"], int(status["header"]["revision"])
        except (LookupError, TypeError, ValueError) as error:
            raise EtcdError(f"unreadable endpoint status: {error}") from None

    def resume_point(self) -> int | None:
        """The first revision to watch: after the chain's last, or else a new segment after the newest kept
        snapshot; None until there is a snapshot that etcd still holds the revisions after."""
        following, self.snapshot_revisions = self.sink.delta_next(self.history)
        newest = max(self.snapshot_revisions, default=None)
        if following is not None and following > self.lost:
            return following
        return newest + 1 if newest is not None and newest + 1 > self.lost else None

    def lease_ttl(self, lease: int) -> int:
        if lease not in self.leases:
            try:
                answer = self.ctl.json([self.env.client_url], "lease", "timetolive", f"{lease:x}")
                self.leases[lease] = int(answer.get("grantedTTL") or 0)
            except (EtcdError, ValueError):
                self.leases[lease] = 0  # revoked already: the replay grants it for an hour
        return self.leases[lease]

    def check(self, revision: int) -> dict[str, int] | None:
        """The live cluster's key count and hashkv at `revision`, when the last one's cost allows it now."""
        if time.monotonic() - self.checked_at < CHECK_SHARE * self.check_cost:
            return None
        started = time.monotonic()
        try:
            found = verify.contents(self.ctl, self.env.client_url, revision, "120s")
        except EtcdError as error:
            log(f"no check recorded at revision {revision}: {error}")
            return None
        self.checked_at, self.check_cost = time.monotonic(), time.monotonic() - started
        return {"revision": revision, **found}

    def ship(self, rows: list[deltalog.Revision]) -> None:
        """Chunks of at most MAX_CHUNK_BYTES; each is taken, or the chain is asked anew."""
        while rows:
            take = rows
            while True:
                leases = {int(op[3]): self.lease_ttl(int(op[3])) for row in take for op in row.ops
                          if op[0] == "put" and int(op[3])}
                chunk = deltalog.Chunk(self.env.cluster_name, self.env.member_name, utc_iso(), tuple(take), leases)
                if len(take) == 1 or len(chunk.encode()) <= deltalog.MAX_CHUNK_BYTES:
                    break
                take = take[: len(take) // 2]
            if take is rows:
                chunk = deltalog.Chunk(chunk.cluster, chunk.member, chunk.closed_at, chunk.revisions, leases,
                                       self.check(chunk.last))
            try:
                self.sink.delta(chunk.encode(), chunk.first, chunk.last, self.history)
            except DeltaRefused as refusal:
                raise Resync(f"{self.backup.dest} refused {chunk.first}..{chunk.last}: {refusal}") from None
            self.archived = chunk.last
            rows = rows[len(take):]
        update_json(self.status, format=1, last_delta_revision=self.archived, last_delta_at=utc_iso())

    def compact(self, revision_now: int) -> None:
        """Every 5 minutes, as kube-apiserver would, to compaction_target."""
        now = time.monotonic()
        self.revisions_seen.append((now, revision_now))
        while len(self.revisions_seen) > 1 and self.revisions_seen[1][0] <= now - COMPACT_EVERY_SECONDS:
            self.revisions_seen.popleft()
        if now - self.compacted_at < COMPACT_EVERY_SECONDS:
            return
        self.compacted_at = now
        target = compaction_target(self.revisions_seen, now, self.archived, self.snapshot_revisions)
        if target <= 1:
            return
        try:
            self.ctl.compact([self.env.client_url], target)
            log(f"compacted to revision {target} (archived through {self.archived})")
        except EtcdError as error:
            log(f"compaction to {target} failed: {error}")

    def follow(self, start: int) -> None:
        """Watch from `start`, ship a chunk every interval while leading; returns when no longer the leader."""
        watch = Watch(self.ctl, self.env.client_url, start)
        self.archived = start - 1
        log(f"leader: archiving from revision {start} every {self.backup.delta_seconds}s to {self.backup.dest}")
        try:
            rows: list[deltalog.Revision] = []
            close_at = time.monotonic() + self.backup.delta_seconds
            while True:
                try:
                    items = [watch.responses.get(timeout=max(0.0, close_at - time.monotonic()))]
                except queue.Empty:
                    items = []
                if time.monotonic() >= close_at:  # what the watch delivered meanwhile (an upload) joins this chunk
                    items += [watch.responses.get_nowait() for _ in range(watch.responses.qsize())]
                for item in items:
                    if item is None:
                        error = watch.error()
                        raise Resync(f"the watch ended: {error}", start if "compacted" in error else 0)
                    rows += revisions_of(*item)
                if time.monotonic() < close_at:
                    continue
                leading, revision_now = self.local_status()
                if rows:
                    self.ship(rows)
                    rows = []
                elif revision_now <= self.archived:  # nothing new: the archive is current
                    update_json(self.status, format=1, last_delta_revision=self.archived, last_delta_at=utc_iso())
                if not leading:
                    log(f"no longer the leader; archived through {self.archived}")
                    return
                self.compact(revision_now)
                # On the interval's beat, not from the end of the upload: a write waits at most one interval plus
                # one upload (an upload longer than the interval is followed at once by a chunk of all seen during it).
                close_at = max(close_at + self.backup.delta_seconds, time.monotonic())
        finally:
            watch.stop()

    def ask_for_snapshot(self) -> None:
        """The chain (or a new segment of it) starts right after a kept snapshot: take one now rather than at the
        next slot, at most every SNAPSHOT_ASK_SECONDS (a snapshot that fails is not retried in a loop)."""
        if time.monotonic() - self.asked_at < SNAPSHOT_ASK_SECONDS:
            return
        self.asked_at = time.monotonic()
        log(f"no kept snapshot after revision {self.lost}: a segment of the chain starts after one; taking one now")
        systemd.systemctl("start", "--no-block", "etcd-backup.service")

    def run(self) -> None:
        while True:
            try:
                leading, _ = self.local_status()
                if not leading:
                    time.sleep(1)
                    continue
                start = self.resume_point()
                if start is None:
                    self.ask_for_snapshot()
                    time.sleep(RETRY_SECONDS)
                    continue
                self.follow(start)
            except Resync as why:
                log(f"{why}; asking {self.backup.dest} where to resume")
                self.lost = max(self.lost, why.compacted_from)
            except (EtcdError, UploadError, OSError) as error:
                log(f"{error}; again in {RETRY_SECONDS}s")
                time.sleep(RETRY_SECONDS)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-delta-archive", description=__doc__.splitlines()[0],
                                     epilog="Reads /etc/etcd/cluster.env and /etc/etcd/backup.env.")
    parser.parse_args(argv)
    backup = load_env(BackupEnv)
    if backup.delta_seconds <= 0:
        raise Abort(2, f"no delta log configured (KCP_BACKUP_DELTA_SECONDS={backup.delta_seconds})")
    Archiver(load_env(ClusterEnv), backup).run()
    return 0
