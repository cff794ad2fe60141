"""The delta log in a restore (components/restore/deltas.py): which snapshot starts it, which chunks carry it to
which revision, what the replaying member is sent and what comes back, and that every refusal comes before any
member was sent anything.

The backup host's folder is filled by its real receiver (kcp_host/receiver.py) wherever the chain is one it
accepts, and broken by hand where a test needs a gap or an overlap. `kcp-host` on the members is a stand-in (every
host is this machine): its `etcd-delta-replay` replays a store kept as JSON, so what it writes shows which snapshot
and which revisions it was sent, in which order; its restore session speaks the members' protocol with the real
header check (test_restore_operator.py runs the real session).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from components.restore import RestoreError
from components.restore.deltas import Replayed, Until
from components.restore.drill import drill_report, summary
from components.restore.members import Host
from components.restore.orchestrate import run_restore
from components.restore.plan import Plan
from components.restore.sources import BackupFolder, DeltaLog, LocalFile
from kcp_host import deltalog
from kcp_host.contract import AGENT
from tests.program import ROOT
from tests.unit.test_restore_operator import LocalShell, plan_for, private_temp, receive

pytestmark = pytest.mark.usefixtures(private_temp.__name__)  # scratch and socket folders under tmp_path

# -- the cluster's history ----------------------------------------------------------------------
# Revision r was archived at T0 + (r - 10) * 8640 s: revision 10 at T0, 15 half a day later, 20 a day later.
T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
S10, S15, S20 = "local-20261101T000000Z", "local-20261101T120000Z", "local-20261102T000000Z"
# The receiver files them in this order, so S15 is the newest arrival although S20 holds the higher revision.
SNAPSHOTS = [(S10, 10), (S20, 20), (S15, 15)]
RANGES = [(11, 15), (16, 20), (21, 25), (26, 30)]
HOSTS = [Host("h1", "10.0.0.1"), Host("h2", "10.0.0.2"), Host("h3", "10.0.0.3")]


def at(rev: int) -> float:
    return T0 + (rev - 10) * 8640


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def ops(rev: int) -> tuple[deltalog.Op, ...]:
    put: deltalog.Op = ("put", b64(f"/registry/k{rev % 5}"), b64(f"value of {rev}"), 0)
    return (put, ("del", b64(f"/registry/k{(rev + 2) % 5}"))) if rev % 4 == 0 else (put,)


def store(rev: int) -> dict[str, Any]:
    """The cluster's keys at a revision (a snapshot's content, for the stand-in)."""
    kv = {b64("/registry/base"): b64("since the start")}
    for r in range(11, rev + 1):
        for op in ops(r):
            if op[0] == "put":
                kv[op[1]] = op[2]
            else:
                kv.pop(op[1], None)
    return {"revision": rev, "kv": kv}


def store_bytes(rev: int) -> bytes:
    return json.dumps(store(rev), sort_keys=True).encode()


def chunk(first: int, last: int) -> deltalog.Chunk:
    check = {"revision": last, "keys": len(store(last)["kv"]), "hashkv": 1, "compact_revision": 0} if last == 30 \
        else None
    return deltalog.Chunk("local", "h1", iso(at(last)), tuple(deltalog.Revision(r, at(r), ops(r))
                                                                for r in range(first, last + 1)), check=check)


def snapshot_meta(name: str, rev: int) -> dict[str, Any]:
    return {"name": name, "cluster": "local", "revision": rev, "keys": len(store(rev)["kv"]), "hashkv": rev,
            "taken_at": iso(at(rev))[:-5] + "Z", "sha256": hashlib.sha256(store_bytes(rev)).hexdigest(),
            "verified": True}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's folder as the backup host's receiver filed it: three snapshots and a chain of four chunks."""
    root = tmp_path_factory.mktemp("backup-host") / "local"
    for name, rev in SNAPSHOTS:
        for request, payload in ((f"put {name}.db", store_bytes(rev)),
                                 (f"put {name}.json", json.dumps(snapshot_meta(name, rev)).encode())):
            assert receive(root, request, payload).returncode == 0, request
    for first, last in RANGES:
        filed = receive(root, f"delta {first} {last}", chunk(first, last).encode())
        assert filed.returncode == 0, filed.stderr
    return root


# -- every host is this machine -----------------------------------------------------------------
STAND_IN = r'''
import json, os, sys, zlib
from pathlib import Path
from kcp_host.restore_member import HEADER

here, argv, stdin = Path(os.environ["FAKE_DIR"]) / os.environ["FAKE_HOST"], sys.argv[1:], sys.stdin.buffer


def replay():
    snapshot_bytes, chunk_bytes = int(argv[1]), int(argv[2])
    until = int(argv[4]) if argv[3:4] == ["--until"] else None
    Path(f"{here}.replay-args").write_text(json.dumps(argv))
    snapshot, chunks = stdin.read(snapshot_bytes), stdin.read(chunk_bytes)
    Path(f"{here}.replay-stdin").write_bytes(snapshot + chunks + stdin.read())
    mode = os.environ.get("FAKE_REPLAY", "")
    if mode == "fail":
        print("h1: starting the throwaway etcd", file=sys.stderr)
        print("h1: the throwaway etcd failed: no space left on device", file=sys.stderr)
        return 1
    store, checks, replayed = json.loads(snapshot), [], 0
    for line in chunks.decode().splitlines():
        row = json.loads(line)
        if "kind" in row:
            checks.append(row["check"])
        elif row["rev"] > store["revision"] and (until is None or row["rev"] <= until):
            if row["rev"] != store["revision"] + 1:
                print(f"h1: revision {row['rev']} follows {store['revision']}", file=sys.stderr)
                return 1
            for op in row["ops"]:
                if op[0] == "put":
                    store["kv"][op[1]] = op[2]
                else:
                    store["kv"].pop(op[1], None)
            store["revision"], replayed = row["rev"], replayed + 1
    out = json.dumps(store, sort_keys=True).encode()
    sys.stdout.buffer.write(out)
    checked = [c["revision"] for c in checks if c and c["revision"] <= store["revision"]]
    result = {"revision": store["revision"] + (mode == "wrong-revision"), "keys": len(store["kv"]),
              "hashkv": zlib.crc32(out), "replayed": replayed, "checked_revision": max(checked, default=None),
              "seconds": 0.1}
    print(f"h1: replayed {replayed} revisions", file=sys.stderr)
    if mode != "no-result":
        print("result " + json.dumps(result), file=sys.stderr)
    return 0


def member():
    def heard():
        line = stdin.readline()
        with open(f"{here}.heard", "ab") as log:
            log.write(line)
        return line.decode()

    def stop(why):
        print(f"{os.environ['FAKE_HOST']}: {why}", file=sys.stderr)
        return 1

    print(f"quorum {os.environ['FAKE_QUORUM']}", flush=True)
    line = heard()
    if not (words := HEADER.fullmatch(line)):
        return stop(f"bad snapshot header {line.strip()!r}" if line else "the operator stopped the restore")
    print("room", flush=True)
    if heard() != "send\n":
        return stop("the operator stopped the restore")
    data = stdin.read(int(words[2]))
    Path(f"{here}.received").write_bytes(data)
    if heard() != "ok\n":
        return stop(f"REFUSED {words[1]}")
    print(f"prepared {len(data)} 0.1 0.1 100 100", flush=True)
    keys = len(json.loads(data)["kv"])
    for word, answer in (("switch", "switched"), ("start", f"healthy 0.1 {keys}\nhashkv 7"), ("apiserver", "done")):
        if not heard().startswith(word):
            return stop("the operator stopped the restore")
        print(answer, flush=True)
    return 0


sys.exit(replay() if argv[0] == "etcd-delta-replay" else member() if argv[:2] == ["etcd-restore-member", "restore"]
         else 2)
'''


@dataclass
class Machine(LocalShell):
    """Every host: the backup host's shell runs here, `kcp-host` is the stand-in; each command is kept."""

    agent: Path = Path("/nonexistent")
    replay_mode: str = ""
    quorum: str = "none"  # what every member answers: whether it sees a healthy quorum
    commands: list[tuple[str, str]] = field(default_factory=list)

    def run(self, address: str, command: str, stdin: Any = None, timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess[bytes]:
        self.commands.append((address, command))
        return super().run(address, command, stdin, timeout, user)

    def popen(self, address: str, command: str, stdin: int = subprocess.DEVNULL,
              user: str | None = None) -> subprocess.Popen[bytes]:
        self.commands.append((address, command))
        here = command.replace(AGENT, f"{shlex.quote(sys.executable)} {shlex.quote(str(self.agent))}")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_DIR": str(self.agent.parent), "FAKE_HOST": address,
               "FAKE_REPLAY": self.replay_mode, "FAKE_QUORUM": self.quorum}
        return subprocess.Popen(["sh", "-c", here], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)

    def replays(self) -> list[tuple[str, str]]:
        return [(address, command) for address, command in self.commands if "etcd-delta-replay" in command]

    def kept(self, host: Host, what: str) -> Path:
        return self.agent.parent / f"{host.address}.{what}"


@dataclass
class World:
    root: Path
    machine: Machine
    folder: BackupFolder

    def replayed(self, until: Until | None = None) -> Replayed:
        return Replayed(self.folder, self.machine, HOSTS[0], until)

    def pick(self, wanted: str | None = None, until: Until | None = None) -> dict[str, Any]:
        return self.replayed(until).pick(wanted)

    def delta(self, first: int, last: int) -> Path:
        return self.root / "deltas" / deltalog.chunk_name(first, last)

    def chunk_bytes(self, *ranges: tuple[int, int]) -> bytes:
        return b"".join(self.delta(*r).read_bytes() for r in ranges)

    def replay_args(self) -> list[str]:
        return list(json.loads(self.machine.kept(HOSTS[0], "replay-args").read_text()))


@pytest.fixture
def world(history: Path, tmp_path: Path) -> World:
    root = tmp_path / "backup-host" / "local"
    shutil.copytree(history, root)
    (tmp_path / "hosts").mkdir()
    agent = tmp_path / "hosts" / "kcp-host"
    agent.write_text(STAND_IN)
    machine = Machine("root", None, agent=agent)
    return World(root, machine, BackupFolder(machine, "backup", str(root)))


# -- the backup host's delta log ----------------------------------------------------------------------
def test_the_delta_log_lists_chunk_names_only_each_with_what_the_receiver_recorded(world: World) -> None:
    deltas = world.root / "deltas"
    for stray in ("notes.delta", "11-15.delta", "0000000000000031-0000000000000032.delta.part",
                  "00000000000000031-0000000000000032.delta", "0000000000000040-0000000000000035.delta"):
        (deltas / stray).write_bytes(b"not a chunk")
    listed = world.folder.deltas({})
    assert [(c["first"], c["last"]) for c in sorted(listed, key=lambda c: c["first"])] == RANGES
    for entry in listed:
        receipt = json.loads((deltas / entry["name"].replace(".delta", ".receipt")).read_text())
        data = (deltas / entry["name"]).read_bytes()
        assert (entry["sha256"], entry["bytes"], entry["file_bytes"]) == (receipt["sha256"], len(data), len(data))
        assert "refused" not in entry


@pytest.mark.parametrize(("damage", "why"), [
    ("no receipt", "no receipt of its arrival"),
    ("another size", "its file has 5 bytes, the backup host received"),
    ("another chunk's receipt", "its receipt is another chunk's"),
])
def test_a_chunk_without_a_matching_receipt_is_listed_as_refused(world: World, damage: str, why: str) -> None:
    receipt = world.root / "deltas" / deltalog.chunk_name(21, 25).replace(".delta", ".receipt")
    if damage == "no receipt":
        receipt.unlink()
    elif damage == "another size":
        world.delta(21, 25).write_bytes(b"short")
    else:
        receipt.write_text((world.root / "deltas" / deltalog.chunk_name(16, 20).replace(".delta", ".receipt"))
                           .read_text())
    refused = {c["name"]: c.get("refused") for c in world.folder.deltas({})}
    assert refused[deltalog.chunk_name(21, 25)].startswith(why)
    assert [name for name, reason in refused.items() if reason] == [deltalog.chunk_name(21, 25)]


def test_only_the_backup_hosts_folder_has_a_delta_log(tmp_path: Path) -> None:
    assert isinstance(BackupFolder(LocalShell("root", None), "b", "/x"), DeltaLog)
    assert not isinstance(LocalFile(tmp_path / "x.db", tmp_path / "x.json"), DeltaLog)


# -- the base snapshot and the chain --------------------------------------------------------------------
def test_by_default_the_newest_arrival_is_carried_to_the_newest_archived_revision(world: World) -> None:
    source = world.replayed()
    meta = source.pick(None)
    out = store_bytes(30)
    assert meta["base"]["name"] == S15, "the newest arrival, not the highest revision (S20)"
    assert {k: meta[k] for k in ("name", "revision", "keys", "hashkv", "file_bytes", "verified", "taken_at")} == {
        "name": f"{S15}_deltas-30", "revision": 30, "keys": len(store(30)["kv"]), "hashkv": zlib.crc32(out),
        "file_bytes": len(out), "verified": True, "taken_at": "2026-11-03T00:00:00.000Z"}
    assert meta["arrived"] == meta["base"]["arrived"]
    assert {k: v for k, v in meta["deltas"].items() if k != "replay_seconds"} == {
        "chunks": 3, "revisions": 15, "first_revision": 16, "last_revision": 30, "last_at": "2026-11-03T00:00:00.000Z",
        "checked_revision": 30, "host": "h1", "note": None}
    chain = [(16, 20), (21, 25), (26, 30)]
    assert world.replay_args() == ["etcd-delta-replay", str(len(store_bytes(15))),
                                   str(len(world.chunk_bytes(*chain))), "--until", "30"]
    assert world.machine.kept(HOSTS[0], "replay-stdin").read_bytes() == store_bytes(15) + world.chunk_bytes(*chain)
    assert [a for a, _ in world.machine.replays()] == ["10.0.0.1"], "replayed once, on the first member"
    with source.open(meta).stream as stream:
        assert stream.read() == out, "the point-in-time snapshot as the member wrote it"
    assert meta["sha256"] == hashlib.sha256(out).hexdigest()
    scratch = Path(meta["replayed_file"]).parent
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
    source.close()
    assert not scratch.exists(), "the replayed snapshot holds every secret of the cluster"


@pytest.mark.parametrize(("until", "base", "chain"), [
    (12, S10, [(11, 15)]),  # only S10 is at or before it
    (18, S15, [(16, 20)]),
    (22, S15, [(16, 20), (21, 25)]),  # S20 holds a higher revision, S15 arrived later
])
def test_until_a_revision_starts_from_the_newest_arrival_at_or_before_it(world: World, until: int, base: str,
                                                                           chain: list[tuple[int, int]]) -> None:
    meta = world.pick(until=until)
    assert (meta["base"]["name"], meta["revision"], meta["name"]) == (base, until, f"{base}_deltas-{until}")
    assert meta["deltas"]["revisions"] == until - meta["base"]["revision"] == meta["deltas"]["last_revision"] - \
        meta["deltas"]["first_revision"] + 1
    assert world.replay_args()[2:] == [str(len(world.chunk_bytes(*chain))), "--until", str(until)]
    assert json.loads(world.machine.kept(HOSTS[0], "replay-stdin").read_bytes()[:len(store_bytes(
        meta["base"]["revision"]))]) == store(meta["base"]["revision"])
    assert Path(meta["replayed_file"]).read_bytes() == store_bytes(until)


def test_a_named_snapshot_is_the_base_and_until_its_own_revision_restores_it_alone(world: World) -> None:
    source = world.replayed(20)
    meta = source.pick(S20)
    assert (meta["name"], meta["revision"], meta["deltas"]["revisions"]) == (S20, 20, 0)
    assert meta["deltas"]["note"] == f"restoring {S20} alone: no archived revision after it up to revision 20"
    assert world.machine.replays() == [], "nothing to replay"
    fetch = source.open(meta)
    with fetch.stream as stream:
        assert stream.read() == store_bytes(20), "the snapshot's own bytes, from the backup host"


def test_with_no_chunk_after_the_snapshot_it_is_restored_alone(world: World) -> None:
    shutil.rmtree(world.root / "deltas")
    meta = world.pick()
    assert (meta["name"], meta["deltas"]["chunks"]) == (S15, 0) and "alone" in meta["deltas"]["note"]
    assert world.machine.replays() == []


@pytest.mark.parametrize(("until", "base", "target", "chain", "note"), [
    (at(25) - 1, S15, 24, [(16, 20), (21, 25)], None),  # the last revision archived at or before the time
    (at(25), S15, 25, [(16, 20), (21, 25)], None),
    (T0 + 6 * 3600, S10, 12, [(11, 15)], None),  # only S10 was taken at or before it
    (at(30) + 3600, S15, 30, [(16, 20), (21, 25), (26, 30)], "is after the newest archived revision (30, at "
                                                               "2026-11-03T00:00:00.000Z): restored up to that one"),
])
def test_until_a_time_restores_the_last_revision_archived_at_or_before_it(
        world: World, until: float, base: str, target: int, chain: list[tuple[int, int]], note: str | None) -> None:
    meta = world.pick(until=datetime.fromtimestamp(until, UTC))
    assert (meta["base"]["name"], meta["revision"], meta["taken_at"]) == (base, target, iso(at(target)))
    assert world.replay_args()[2:] == [str(len(world.chunk_bytes(*chain))), "--until", str(target)]
    assert Path(meta["replayed_file"]).read_bytes() == store_bytes(target)
    assert (note is None and meta["deltas"]["note"] is None) or note in meta["deltas"]["note"]


def test_a_gap_after_the_time_does_not_matter(world: World) -> None:
    world.delta(26, 30).unlink()
    meta = world.pick(until=datetime.fromtimestamp(at(22), UTC))
    assert meta["revision"] == 22


# -- refusals, all before anything moved ----------------------------------------------------------------
def unlink_chunk(world: World, first: int, last: int) -> None:
    world.delta(first, last).unlink()
    (world.root / "deltas" / deltalog.chunk_name(first, last).replace(".delta", ".receipt")).unlink()


def overlap(world: World) -> None:
    """A chunk the receiver would refuse (it repeats revisions 18..20), planted with a receipt that matches it."""
    name = deltalog.chunk_name(18, 22)
    data = chunk(18, 22).encode()
    world.delta(18, 22).write_bytes(data)
    (world.root / "deltas" / name.replace(".delta", ".receipt")).write_text(json.dumps(
        {"format": 1, "name": name, "first": 18, "last": 22, "arrived": 1.0, "arrived_at": "x",
         "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def time_of(rev: int) -> datetime:
    return datetime.fromtimestamp(at(rev), UTC)


@pytest.mark.parametrize(("damage", "wanted", "until", "message"), [
    (lambda w: unlink_chunk(w, 21, 25), None, None,
     r"the delta log cannot carry local-20261101T120000Z \(revision 15\) on: gap: revisions 21\.\.25 are in no chunk"),
    (lambda w: unlink_chunk(w, 21, 25), None, time_of(28), r"gap: revisions 21\.\.25 are in no chunk"),
    (overlap, None, None, r"overlap: chunk 18\.\.22 repeats revisions"),
    (overlap, None, time_of(23), r"overlap: chunk 18\.\.22 repeats revisions"),
    (lambda w: w.delta(21, 25).with_suffix(".receipt").unlink(), None, None,
     r"gap: revisions 21\.\.25 .*; left out: 0000000000000021-0000000000000025\.delta \(no receipt of its arrival\)"),
    (None, None, 31, r"revision 31 is not archived: the chain from revision 15 ends at 30"),
    (None, None, 9, r"no snapshot to start from at or before revision 9 \(no verified snapshot found"),
    (None, None, time_of(5), r"no snapshot to start from at or before 2026-10-31T12:00:00\.000Z"),
    (None, S20, 15, r"--until revision 15 is before local-20261102T000000Z \(revision 20, taken "
                    r"2026-11-02T00:00:00Z\)"),
    (None, S20, time_of(19), r"--until 2026-11-01T21:36:00\.000Z is before local-20261102T000000Z"),
])
def test_a_chain_that_cannot_reach_the_target_is_refused_before_any_replay(
        world: World, damage: Any, wanted: str | None, until: Until | None, message: str) -> None:
    if damage:
        damage(world)
    with pytest.raises(RestoreError, match=message) as refused:
        world.pick(wanted, until)
    assert str(refused.value).endswith("; nothing was changed")
    if "gap" in message or "overlap" in message or "not archived" in message:
        assert "--until REVISION, or the snapshot alone with --no-deltas" in str(refused.value)
    assert world.machine.replays() == []


def test_a_chunk_changed_since_it_arrived_is_refused_by_its_receipts_sha256(world: World) -> None:
    data = bytearray(world.delta(21, 25).read_bytes())
    data[-5] ^= 0x01  # same size: only the sha256 tells
    world.delta(21, 25).write_bytes(bytes(data))
    receipt = json.loads(world.delta(21, 25).with_suffix(".receipt").read_text())
    with pytest.raises(RestoreError, match=rf"delta chunk 0000000000000021-0000000000000025\.delta on backup is not "
                                           rf"the one that arrived \(read {len(data)} bytes, sha256 [0-9a-f]{{64}}; "
                                           rf"its receipt says {len(data)} bytes, sha256 {receipt['sha256']}\): "
                                           "refusing it; nothing was changed"):
        world.pick()
    assert world.machine.replays() == []


def test_a_base_snapshot_changed_since_it_arrived_stops_the_replay(world: World) -> None:
    damaged = bytearray(store_bytes(15))
    damaged[3] ^= 0x01
    (world.root / f"{S15}.db").write_bytes(bytes(damaged))
    with pytest.raises(RestoreError, match=rf"REFUSED the base snapshot {S15}: sha256 of the {len(damaged)} bytes is "
                                           r"[0-9a-f]+, expected [0-9a-f]+ \(corrupt\); nothing was changed"):
        world.pick()


@pytest.mark.parametrize(("mode", "message"), [
    ("fail", r"the replay on h1 failed \(exit 1\): h1: starting the throwaway etcd / h1: the throwaway etcd failed: "
             r"no space left on device; nothing was changed$"),
    ("no-result", r"the replay on h1 failed \(exit 0\): h1: replayed 15 revisions; nothing was changed$"),
    ("wrong-revision", r"the replay on h1 reached revision 31 with 15 revisions replayed .* not revision 30 with 15"),
])
def test_a_replay_that_fails_or_gives_no_result_is_refused_with_its_last_lines(world: World, mode: str,
                                                                                message: str) -> None:
    world.machine.replay_mode = mode
    with pytest.raises(RestoreError, match=message):
        world.pick()


# -- the whole restore --------------------------------------------------------------------------------
def plan_of(world: World) -> Plan:
    return Plan(HOSTS, world.machine, world.folder, deltas=world.replayed())


def test_the_restore_streams_the_replayed_snapshot_to_every_member_and_reports_it(
        world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = run_restore(plan_of(world), None, force=False)
    assert (report["snapshot"], report["base_snapshot"], report["revision"]) == (f"{S15}_deltas-30", S15, 30)
    assert report["restored_revision"] == 30 + 1_000_000_000 and report["keys"] == len(store(30)["kv"])
    assert report["taken_at"] == "2026-11-03T00:00:00.000Z" and report["deltas"]["revisions"] == 15
    for host in HOSTS:  # the name passed the members' own header check
        assert world.machine.kept(host, "received").read_bytes() == store_bytes(30), host
    assert [a for a, _ in world.machine.replays()] == ["10.0.0.1"]
    assert re.search(r"restored to revision 30 \(as of 2026-11-03T00:00:00\.000Z\): snapshot "
                     rf"{S15} \+ 15 revisions from 3 chunks, replayed and checked on h1 in [0-9.]+ s\n",
                     capsys.readouterr().err)
    assert not list(tmp_path.glob("kcp-restore-deltas-*")), "the replayed snapshot is deleted after the restore"
    # A new history begins: the delta log is kept aside by the restore's token, and a restore can still use it.
    aside = world.root / f"deltas.before-{report['token']}"
    assert not (world.root / "deltas").exists() and aside.is_dir()
    world.folder.delta_dir = aside.name
    again = run_restore(plan_of(world), None, force=False, quiet=True)
    assert (again["revision"], again["base_snapshot"]) == (30, S15)


@pytest.mark.parametrize("damage", ["gap", "changed chunk", "failed replay"])
def test_a_refusal_ends_every_member_session_before_any_member_was_sent_anything(world: World, damage: str) -> None:
    if damage == "gap":
        unlink_chunk(world, 16, 20)
    elif damage == "changed chunk":
        world.delta(16, 20).write_bytes(world.delta(16, 20).read_bytes().replace(b"h1", b"h2"))
    else:
        world.machine.replay_mode = "fail"
    with pytest.raises(RestoreError, match="nothing was changed") as refused:
        run_restore(plan_of(world), None, force=False, quiet=True)
    assert "the operator stopped" not in str(refused.value), "the members' own reason is left out"
    for host in HOSTS:
        heard = world.machine.kept(host, "heard")
        assert not heard.exists() or heard.read_bytes() == b"", f"{host.name} was told {heard.read_bytes()!r}"
        assert not world.machine.kept(host, "received").exists()
    assert (world.root / "deltas").is_dir(), "a refused restore leaves the delta log where it is"


def test_a_drill_leaves_the_live_clusters_delta_log_where_it_is(world: World) -> None:
    """A drill restores onto scratch hosts: the cluster whose backups it uses goes on, and so does its chain."""
    plan = plan_of(world)
    plan.new_history = False
    assert run_restore(plan, None, force=False, quiet=True)["revision"] == 30
    assert (world.root / "deltas").is_dir() and not list(world.root.glob("deltas.before-*"))
    assert "plan.new_history = False" in (ROOT / "scripts" / "dr-drill").read_text()


def test_a_live_quorum_is_refused_before_the_delta_log_is_replayed(world: World) -> None:
    """The replay is seconds to minutes of a member's work: a restore that will be refused does none of it."""
    world.machine.quorum = "healthy"
    with pytest.raises(RestoreError, match="the cluster has a healthy quorum"):
        run_restore(plan_of(world), None, force=False, quiet=True)
    assert world.machine.replays() == []
    world.machine.quorum = "none"
    assert run_restore(plan_of(world), None, force=False, quiet=True)["revision"] == 30
    assert len(world.machine.replays()) == 1


# -- flags and the drill ----------------------------------------------------------------------------
BACKUP_HOST = ("--hosts", "h1=10.9.0.1,h2=10.9.0.2", "--backup-host", "10.9.0.9", "--backup-path", "/b/local")


def test_a_restore_from_the_backup_host_replays_its_delta_log_on_the_first_member_unless_told_not_to() -> None:
    plan = plan_for(*BACKUP_HOST)
    assert plan.deltas is not None and plan.reader is plan.deltas
    assert (plan.deltas.source, plan.deltas.ssh, plan.deltas.host, plan.deltas.until) == \
        (plan.source, plan.ssh, plan.hosts[0], None)
    until = plan_for(*BACKUP_HOST, "--until", "1234").deltas
    assert until is not None and until.until == 1234
    plain = plan_for(*BACKUP_HOST, "--no-deltas")
    assert plain.deltas is None and plain.reader is plain.source


@pytest.mark.parametrize("text", ["2026-12-01T06:30:00Z", "2026-12-01T07:30:00+01:00", "2026-12-01T06:30:00.000Z"])
def test_until_a_time_is_read_in_utc(text: str) -> None:
    plan = plan_for(*BACKUP_HOST, "--until", text)
    assert plan.deltas is not None and plan.deltas.until == datetime(2026, 12, 1, 6, 30, tzinfo=UTC)


@pytest.mark.parametrize(("text", "why"), [
    ("2026-12-01T06:30:00", "has no zone: give the time in UTC"),
    ("yesterday", "is neither a revision nor an ISO 8601 time"),
    ("-5", "is neither a revision"),
])
def test_an_until_that_is_neither_a_revision_nor_a_time_with_its_zone_is_a_usage_error(
        text: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        plan_for(*BACKUP_HOST, f"--until={text}")
    assert usage.value.code == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize("flags", [("--snapshot-file", "/x.db", "--metadata", "/x.json"), ("--no-deltas",)])
def test_until_without_a_delta_log_is_refused(flags: tuple[str, ...]) -> None:
    with pytest.raises(RestoreError, match="--until needs the delta log"):
        plan_for(*BACKUP_HOST, *flags, "--until", "5")
    assert plan_for(*BACKUP_HOST, *flags).deltas is None, "without --until: the snapshot alone, as before"


@pytest.mark.parametrize("flags", [("--bucket", "s3://b/p"),
                                   ("--snapshot-file", "/x.db", "--metadata", "/x.json", "--delta-dir", "/d")])
def test_a_bucket_and_a_downloaded_chunk_folder_have_a_delta_log(flags: tuple[str, ...]) -> None:
    plan = plan_for(*BACKUP_HOST, *flags, "--until", "5")
    assert isinstance(plan.deltas, Replayed) and plan.deltas.until == 5, plan.deltas
    with pytest.raises(RestoreError, match="--delta-dir goes with --snapshot-file"):
        plan_for(*BACKUP_HOST, "--delta-dir", "/d")


@pytest.mark.parametrize(("taken_at", "rpo", "shown"), [
    ("2026-11-03T00:00:00.250Z", 59.8, "RPO 60s"),  # the last replayed revision's time, milliseconds and all
    ("2026-11-03T00:00:00Z", 60.0, "RPO 60s"),  # a snapshot's
    ("2026-11-03T00:02:00.000Z", 0.0, "RPO 0s"),  # archived after the drill started: nothing lost
    (None, None, "RPO unknown"),
])
def test_the_drills_rpo_is_the_age_of_the_restored_point_when_it_started(taken_at: str | None, rpo: float | None,
                                                                          shown: str) -> None:
    report = {"snapshot": f"{S15}_deltas-30", "base_snapshot": S15, "taken_at": taken_at, "rto_seconds": 3.0,
              "total_seconds": 4.0, "revision": 30, "keys": 5, "steps": {}, "deltas": {"revisions": 15}}
    checks = {"key_count": {"ok": True, "found": 5}, "sample": {"ok": True, "read": 5, "asked": 5}}
    plan = Plan(HOSTS, LocalShell("root", None), BackupFolder(LocalShell("root", None), "b", "/x"))
    result = drill_report(plan, report, checks, datetime(2026, 11, 3, 0, 1, tzinfo=UTC))
    assert result["rpo_seconds"] == rpo
    assert (result["base_snapshot"], result["deltas"]) == (S15, {"revisions": 15})
    assert shown in summary(result)
