"""The restore sequence: every member rebuilt from the same snapshot with a fresh cluster token.

With the backup host's delta log, that snapshot is the point-in-time one which picking it replayed on the first
member (components/restore/deltas.py); the replay's time counts in the pick step, and in the RTO.

A restore creates a new logical cluster. Steps run on all members in parallel, and a step
starts only once every member finished the previous one: a refused snapshot (its sha256 or
size differs from the recorded one, or a member cannot restore it) leaves the whole cluster
untouched. Each step's time and each member's own timings are printed; the report has them.
"""

from __future__ import annotations

import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from components.restore import RestoreError, deltas, members
from components.restore.plan import Plan
from components.restore.sources import DeltaLog
from components.restore.stream import SnapshotStream, fan_out, header
from kcp_host.files import widen_pipe

Sessions = dict[str, members.Session]  # member name -> its `restore` session


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
    for name, session in sessions.items():
        assert session.proc.stdin
        widen_pipe(session.proc.stdin)
        sinks[name] = session.proc.stdin
    return sinks


def show(sessions: Sessions, clock: Clock) -> None:
    """What the members logged since the last time (their own timings), under the running step."""
    for session in sessions.values():
        for line in session.news():
            clock.note(line)


def halt(sessions: Sessions, message: str) -> RestoreError:
    """End every session and say why: the message, then why each member stopped, except the members that stopped
    only because the operator did. A member that had not switched removes what it prepared."""
    reasons = [why for session in sessions.values() if (why := session.end()) and "the operator stopped" not in why]
    return RestoreError("; ".join([message, *reasons]))


def expect(sessions: Sessions, answers: dict[str, list[str]], word: str, clock: Clock, message: str) -> None:
    """Every member answered `word`, or the restore stops here with `message` (`{names}`: those that did not)."""
    show(sessions, clock)
    if failed := [name for name, words in answers.items() if words[:1] != [word]]:
        raise halt(sessions, message.format(names=", ".join(failed)))


def pick_and_guard(plan: Plan, sessions: Sessions, snapshot_name: str | None, force: bool,
                   clock: Clock) -> dict[str, Any]:
    """The snapshot's metadata, picked while every member says whether it sees a healthy quorum.

    Every member is asked, so one member that is cut off cannot hide a cluster that still works: a restore
    discards every write since the snapshot. A refusal ends every session: nothing was written anywhere. A pick
    that replays the delta log (seconds to minutes of work on a member) starts only once the members answered.
    """
    with ThreadPoolExecutor(max_workers=len(sessions) + 1) as pool:
        picked = pool.submit(plan.deltas.choose if plan.deltas else plan.reader.pick, snapshot_name)
        seen = {name: pool.submit(session.answer) for name, session in sessions.items()}
    try:
        found = picked.result()
    except RestoreError as exc:
        raise halt(sessions, f"{exc}; nothing was changed" if plan.deltas else str(exc)) from None
    answers = {name: future.result() for name, future in seen.items()}
    if unanswered := [name for name, words in answers.items() if words not in (["quorum", "healthy"],
                                                                                ["quorum", "none"])]:
        raise halt(sessions, f"{', '.join(unanswered)} did not answer (their errors follow); nothing was changed")
    if healthy := [name for name, words in answers.items() if words == ["quorum", "healthy"]]:
        if not force:
            raise halt(sessions, f"the cluster has a healthy quorum (seen from {', '.join(healthy)}); a restore "
                                 "would discard every write since the snapshot. Nothing was changed. Use --force to "
                                 "restore anyway.")
        clock.step(f"healthy quorum seen from {', '.join(healthy)}; continuing because of --force")
    if not plan.deltas:
        return found
    try:
        return plan.deltas.pick(snapshot_name, found)
    except RestoreError as exc:
        raise halt(sessions, str(exc)) from None


def stream_and_prepare(plan: Plan, sessions: Sessions, meta: dict[str, Any],
                       clock: Clock) -> dict[str, dict[str, float]]:
    """The snapshot from its source into every member at once (each has room for it); each member's timings
    and peak memory."""
    fetch = plan.reader.open(meta)
    stream = SnapshotStream(fetch.stream, meta)
    for session in sessions.values():
        session.say("send")
    with fetch.stream:
        fan_out(stream, stdin_of(sessions), close=False)
    answers = members.ask(sessions, None, timeout=300 + int(meta["file_bytes"]) / 5e6)
    show(sessions, clock)
    failed = [name for name, words in answers.items() if words[:1] != ["prepared"]]
    why = [w for w in (fetch.failure(stream.count), None if failed else stream.refusal) if w]  # members say theirs
    if failed or why:
        raise halt(sessions, "; ".join([f"REFUSED {meta['name']}; no member was changed", *why]))
    return {name: dict(zip(("bytes", "receive_seconds", "restore_seconds", "peak_kib", "restore_tool_peak_kib"),
                           map(float, words[1:]), strict=False)) for name, words in answers.items()}


def restore(plan: Plan, snapshot_name: str | None, force: bool, clock: Clock) -> dict[str, Any]:
    """One session per member from start to end; each phase starts only once every member finished the previous:
    prepare everywhere first, then stop API servers and switch data dirs, then start etcd."""
    token = f"restore-{secrets.token_hex(4)}"
    clock.step(f"picking the snapshot from {plan.reader.where()}; asking every member whether a healthy quorum "
               "still exists")
    sessions = {h.name: members.Session(plan.ssh, h, token, plan.revision_bump) for h in plan.hosts}
    try:
        meta = pick_and_guard(plan, sessions, snapshot_name, force, clock)
        name, rev = meta["name"], int(meta["revision"])
        if replay := deltas.step_line(meta):  # the replay ran in pick: part of this step's time and of the RTO
            clock.step(replay)
        expect(sessions, members.ask(sessions, header(meta), timeout=60), "room", clock,
               f"{{names}} refused {name} before any byte moved; nothing was changed")
        clock.done("pick_and_quorum_check")
        clock.step(f"streaming {name} taken {meta.get('taken_at')} (revision {rev}, {meta.get('keys')} keys, "
                   f"verified {meta.get('verified')}, {int(meta['file_bytes']) / 2**20:.0f} MiB; every member has "
                   f"room) to {', '.join(sessions)} and restoring it beside the live data (cluster token {token})")
        timings = stream_and_prepare(plan, sessions, meta, clock)
        clock.done("stream_and_prepare")
        # Each member stops its API server before its etcd, and no etcd starts before every member got that far:
        # no API server ever talks to the restored cluster.
        clock.step("stopping the API servers and etcd; putting the restored data in place on every member")
        expect(sessions, members.ask(sessions, "switch", timeout=120), "switched", clock,
               "switching failed on {names}; etcd and the API servers stay stopped where switched (docs/backups.md)")
        clock.done("stop_and_switch")
        restored_rev = rev + plan.revision_bump
        clock.step(f"starting etcd on every member; each waits until it is healthy at revision {restored_rev} (the "
                   f"snapshot's {rev} + {plan.revision_bump}, compacted there) and reports its key count, then its "
                   "hashkv")
        with ThreadPoolExecutor(max_workers=1) as pool:  # no chunk can reach the backup host before etcd is up
            moved = pool.submit(restart_delta_log, plan, token, clock)
            answers = members.ask(sessions, f"start {restored_rev}", timeout=180)
        moved.result()
        expect(sessions, answers, "healthy", clock, "{names} not healthy; the API servers stay stopped")
        check_key_counts(sessions, answers, meta)
        clock.done("start_and_wait_healthy")
        rto = clock.total
        clock.step(f"cluster healthy at revision {restored_rev} with {meta.get('keys')} keys on every member; "
                   "comparing the members' hashkv before any API server starts")
        hashes = members.ask(sessions, None, timeout=120 + int(meta["file_bytes"]) / 20e6)
        expect(sessions, hashes, "hashkv", clock, "{names} reported no hashkv; the API servers stay stopped")
        hashkv = check_same_data(sessions, hashes, meta, plan.revision_bump)
        clock.done("compare_hashkv")
        verified = clock.total
        clock.step(f"every member holds the same data (hashkv {hashkv}); starting the API servers")
        expect(sessions, members.ask(sessions, "apiserver", timeout=120), "done", clock,
               "starting the API servers failed on {names}")
    finally:
        for session in sessions.values():
            session.end()
    clock.done("start_apiservers")
    retire_spares(plan, clock)
    return {"snapshot": name, "revision": rev, "restored_revision": restored_rev, "revision_bump": plan.revision_bump,
            "hashkv": hashkv, "token": token, "rto_seconds": round(rto, 3), "verified_seconds": round(verified, 3),
            "members": timings,
            "taken_at": meta.get("taken_at"), "keys": meta.get("keys"), "deltas": meta.get("deltas"),
            "base_snapshot": meta.get("base", meta)["name"]}


def restart_delta_log(plan: Plan, token: str, clock: Clock) -> None:
    """The restored cluster is a new history: what the delta log holds after the restored point is another one's,
    and a restore to an earlier point, or without the bump, would hand those revisions out again. So, while no
    etcd runs anywhere, the log moves aside (kept, named by the token); each member's archiver starts a new chain
    after the restored cluster's first snapshot. Only the backup host's folder has a delta log."""
    if plan.new_history and isinstance(plan.source, DeltaLog):
        aside = f"deltas.before-{token}"
        try:
            if plan.source.set_deltas_aside(aside):
                clock.note(f"the delta log moved aside to {aside} on the backup host: a new chain starts after the "
                           "restored cluster's first snapshot")
        except RestoreError as error:  # the restore itself is done: say what is left to do
            clock.step(f"WARNING: {error}; move <backup folder>/deltas to {aside} by hand before the archivers "
                       "resume (docs/backups.md)")


def check_key_counts(sessions: Sessions, answers: dict[str, list[str]], meta: dict[str, Any]) -> None:
    """Every member, healthy, counts the recorded number of keys at the restored revision."""
    counts = {name: int(words[2]) for name, words in answers.items()}
    if meta.get("keys") is not None and set(counts.values()) != {int(meta["keys"])}:
        raise halt(sessions, f"restored key counts {counts} != recorded {meta['keys']}; API servers left stopped")


def check_same_data(sessions: Sessions, answers: dict[str, list[str]], meta: dict[str, Any], bump: int) -> int:
    """Every member serves the same data (hashkv); unbumped, also the recorded hashkv. A bump changes the hashkv (it
    covers the compaction point), not the keys. Returns the hashkv."""
    hashes = {name: int(words[1]) for name, words in answers.items()}
    hashkv = next(iter(hashes.values()))
    if set(hashes.values()) != {hashkv}:
        raise halt(sessions, f"the restored members differ: hashkv {hashes}; API servers left stopped")
    if not bump and meta.get("hashkv") is not None and hashkv != int(meta["hashkv"]):
        raise halt(sessions, f"restored cluster hashkv {hashkv} != recorded {meta['hashkv']}; API servers left "
                             "stopped")
    return hashkv


def retire_spares(plan: Plan, clock: Clock) -> None:
    """After the RTO: a spare's etcd from the replaced cluster cannot disturb the restored one (another
    cluster ID), but would retry forever. A spare that cannot be reached is named, not fatal."""
    for host in plan.spares:
        try:
            members.run(plan.ssh, host, [["retire-spare"]], note=clock.note)
        except RestoreError as error:
            clock.step(f"WARNING: spare {host.name} not retired ({error}); run `kcp-host etcd-restore-member "
                       "retire-spare` on it before it comes back")


def run_restore(plan: Plan, snapshot_name: str | None, force: bool, quiet: bool = False) -> dict[str, Any]:
    """Pick, stream and check the snapshot, refuse a live quorum, then restore; returns the report."""
    clock = Clock(quiet)
    try:
        report = restore(plan, snapshot_name, force, clock)
    finally:
        plan.ssh.close([*plan.addresses(), *(spare.address for spare in plan.spares)])
        plan.reader.close()
    report.update(total_seconds=round(clock.total, 3), steps=clock.steps)
    clock.step(f"done: restored {report['snapshot']} in {report['total_seconds']:.2f}s (healthy with every key "
               f"after {report['rto_seconds']:.2f}s, the members' hashkv compared after "
               f"{report['verified_seconds']:.2f}s)")
    return report
