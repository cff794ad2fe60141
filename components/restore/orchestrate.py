"""The restore sequence: every member rebuilt from the same snapshot with a fresh cluster token.

A restore creates a new logical cluster. Steps run on all members in parallel, and a step
starts only once every member finished the previous one: a refused snapshot (its sha256 or
size differs from the recorded one, or a member cannot restore it) leaves the whole cluster
untouched. Each step's time and each member's own timings are printed; the report has them.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from components.restore import RestoreError, members
from components.restore.plan import Plan
from components.restore.ssh import widen_pipe
from components.restore.stream import SnapshotStream, fan_out

Sessions = dict[str, subprocess.Popen[bytes]]  # member name -> its `prepare` session


class Clock:
    """Prints each step with the time since the start: the restore's RTO, step by step."""

    def __init__(self, quiet: bool = False) -> None:
        self.start = time.monotonic()
        self.quiet = quiet
        self.steps: dict[str, float] = {}
        self._last = self.start

    def step(self, text: str) -> None:
        """Print what starts now; the time it takes is recorded by done()."""
        if not self.quiet:
            print(f"[{time.monotonic() - self.start:7.2f}s] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A detail of the running step (e.g. one member's own timings)."""
        if not self.quiet:
            print(f"{'':11}{text}", file=sys.stderr, flush=True)

    def done(self, key: str) -> None:
        """Record the time since the previous done(): the steps add up to the total."""
        now = time.monotonic()
        self.steps[key] = round(now - self._last, 3)
        self._last = now

    @property
    def total(self) -> float:
        return time.monotonic() - self.start


def stdin_of(sessions: Sessions) -> dict[str, IO[bytes]]:
    """Each session's stdin, with a wide pipe: the snapshot goes through it."""
    sinks = {}
    for name, proc in sessions.items():
        assert proc.stdin
        widen_pipe(proc.stdin)
        sinks[name] = proc.stdin
    return sinks


def pick_and_guard(plan: Plan, sessions: Sessions, snapshot_name: str | None, force: bool,
                   clock: Clock) -> dict[str, Any]:
    """The snapshot's metadata, picked while every member says whether it sees a healthy quorum.

    Every member is asked, so one member that is cut off cannot hide a cluster that still
    works: a restore discards every write since the snapshot. A refusal sends `abort` to every
    member: nothing was written anywhere.
    """
    with ThreadPoolExecutor(max_workers=len(sessions) + 1) as pool:
        picked = pool.submit(plan.source.pick, snapshot_name)
        seen = {name: pool.submit(members.first_line, proc) for name, proc in sessions.items()}
    try:
        meta = picked.result()
        answers = {name: future.result() for name, future in seen.items()}
        if unanswered := [name for name, line in answers.items() if line not in ("quorum healthy", "quorum none")]:
            raise RestoreError(f"{', '.join(unanswered)} did not answer (their errors follow); nothing was changed")
        if healthy := [name for name, line in answers.items() if line == "quorum healthy"]:
            if not force:
                raise RestoreError(f"the cluster has a healthy quorum (seen from {', '.join(healthy)}); a restore "
                                   "would discard every write since the snapshot. Nothing was changed. Use --force "
                                   "to restore anyway.")
            clock.step(f"healthy quorum seen from {', '.join(healthy)}; continuing because of --force")
    except RestoreError as exc:
        fan_out([b"abort\n"], stdin_of(sessions))
        failures, _ = members.collect(sessions, clock.note)
        unrelated = [f for f in failures if "stopped before sending" not in f]
        raise RestoreError("; ".join([str(exc), *unrelated])) from None
    return meta


def stream_and_prepare(plan: Plan, sessions: Sessions, meta: dict[str, Any],
                       clock: Clock) -> dict[str, dict[str, float]]:
    """The snapshot from its source into every member at once; each member's timings."""
    fetch = plan.source.open(meta)
    stream = SnapshotStream(fetch.stream, meta)
    with fetch.stream:
        fan_out(stream, stdin_of(sessions))
    failures, timings = members.collect(sessions, clock.note)
    if why := fetch.failure(stream.count):
        failures.insert(0, why)
    if stream.refusal and not failures:
        failures.append(stream.refusal)  # every member refused it; say why once
    if stream.refusal or failures:
        raise RestoreError(f"REFUSED {meta['name']}; no member was changed: " + "; ".join(failures))
    return timings


def stage(plan: Plan, snapshot_name: str | None, force: bool, token: str,
          clock: Clock) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Pick the snapshot, refuse to overwrite a live quorum, and prepare it on every member at once.

    One SSH session per member does it all (`prepare`): it first reports whether that member
    sees a healthy quorum, so its connection is made while the backups are listed. Then the
    snapshot streams from its source to all members at once. `prepare` only writes beside the
    live data, so a refusal anywhere leaves every member as it was. Returns the metadata and
    each member's timings.
    """
    clock.step(f"picking the snapshot from {plan.source.where()}; asking every member whether a healthy quorum "
               "still exists")
    sessions = {h.name: members.start(plan.ssh, h, [["prepare", "--token", token]], stdin=subprocess.PIPE)
                for h in plan.hosts}
    meta = pick_and_guard(plan, sessions, snapshot_name, force, clock)
    clock.done("pick_and_quorum_check")
    clock.step(f"streaming {meta['name']} taken {meta.get('taken_at')} (revision {meta['revision']}, "
               f"{meta.get('keys')} keys, verified {meta.get('verified')}) to {', '.join(sessions)} and restoring "
               f"it beside the live data (cluster token {token})")
    timings = stream_and_prepare(plan, sessions, meta, clock)
    clock.done("stream_and_prepare")
    return meta, timings


def start_and_wait(plan: Plan, revision: int, clock: Clock) -> int:
    """Start etcd everywhere and, at the same time, wait for a healthy cluster at `revision`; its hashkv.

    Every old etcd is gone by now, so the health check can run while the members start.
    """
    clock.step(f"starting etcd on every member; waiting for a healthy cluster at revision {revision}")
    wait = [["wait-healthy", "--revision", str(revision), "--timeout", "120"]]
    health = members.start(plan.ssh, plan.hosts[0], wait)
    try:
        members.parallel(plan.hosts, lambda h: members.run(plan.ssh, h, [["start-etcd"]], note=clock.note))
    except RestoreError:
        health.kill()
        health.communicate()
        raise
    return int(members.finish(health, wait, timeout=180, note=clock.note).split()[-1])


def retire_spares(plan: Plan, clock: Clock) -> None:
    """After the RTO: a spare's etcd from the replaced cluster cannot disturb the restored one (another
    cluster ID), but would retry forever. A spare that cannot be reached is named, not fatal."""
    for host in plan.spares:
        try:
            members.run(plan.ssh, host, [["retire-spare"]], note=clock.note)
        except RestoreError as error:
            clock.step(f"WARNING: spare {host.name} not retired ({error}); run `kcp-host etcd-restore-member "
                       "retire-spare` on it before it comes back")


def restore(plan: Plan, snapshot_name: str | None, force: bool, clock: Clock) -> dict[str, Any]:
    """Prepare everywhere first; only then stop API servers, switch data dirs and start etcd."""
    token = f"restore-{secrets.token_hex(4)}"
    meta, timings = stage(plan, snapshot_name, force, token, clock)
    name, rev = meta["name"], int(meta["revision"])
    # Each member stops its API server before its etcd, and no etcd starts before every
    # member got that far: no API server ever talks to the restored cluster.
    clock.step("stopping the API servers and etcd; putting the restored data in place on every member")
    members.parallel(plan.hosts, lambda h: members.run(plan.ssh, h, [["stop-apiserver"], ["switch", "--token", token]]))
    clock.done("stop_and_switch")
    hashkv = start_and_wait(plan, rev, clock)
    if meta.get("hashkv") is not None and hashkv != int(meta["hashkv"]):
        raise RestoreError(f"restored cluster hashkv {hashkv} != recorded {meta['hashkv']}; API servers left stopped")
    clock.done("start_and_wait_healthy")
    rto = clock.total
    clock.step(f"cluster healthy (revision {rev}, hashkv {hashkv}); starting the API servers")
    members.parallel(plan.hosts, lambda h: members.run(plan.ssh, h, [["start-apiserver"]]))
    clock.done("start_apiservers")
    retire_spares(plan, clock)
    return {"snapshot": name, "revision": rev, "hashkv": hashkv, "token": token, "rto_seconds": round(rto, 3),
            "members": timings, "taken_at": meta.get("taken_at"), "keys": meta.get("keys")}


def run_restore(plan: Plan, snapshot_name: str | None, force: bool, quiet: bool = False) -> dict[str, Any]:
    """Pick, stream and check the snapshot, refuse a live quorum, then restore; returns the report."""
    clock = Clock(quiet)
    try:
        report = restore(plan, snapshot_name, force, clock)
    finally:
        plan.ssh.close(plan.addresses())
        plan.source.close()
    report.update(total_seconds=round(clock.total, 3), steps=clock.steps)
    clock.step(f"done: restored {report['snapshot']} in {report['total_seconds']:.2f}s "
               f"(healthy after {report['rto_seconds']:.2f}s)")
    return report
