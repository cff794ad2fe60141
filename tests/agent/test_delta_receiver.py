"""The delta log on the backup host: `delta FIRST LAST` and `delta-next` of the receiver, and the etcd hosts' client
of them (`Receiver.delta`, `Receiver.delta_next` in kcp_host/destinations.py).

The receiver runs as the backup host runs it (test_backup_agent.py's `Receiver`: SSH_ORIGINAL_COMMAND and the chunk
on stdin) against a temporary folder; the client runs against a stand-in `ssh` that runs that same receiver.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from kcp_host import deltalog, destinations
from kcp_host.contract import BackupEnv
from kcp_host.destinations import DeltaRefused, UploadError
from tests.agent.test_backup_agent import (
    CLUSTER,
    FAKE_SSH,
    ROOT,
    SSH_DEST,
    Receiver,
    days_ago,
)

ERROR = "etcd-backup-receive: ERROR: "
HISTORY = "0123456789abcdef"  # the cluster ID a bucket names its log by; the backup host has one log


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunk(first: int, last: int, cluster: str = CLUSTER, member: str = "h1", value: bytes = b"v") -> deltalog.Chunk:
    """One put per revision, as the archiver would close it."""
    revisions = tuple(deltalog.Revision(rev, 1_767_225_600.0 + rev, (("put", b64(f"/k{rev}".encode()), b64(value), 0),))
                      for rev in range(first, last + 1))
    return deltalog.Chunk(cluster, member, "2026-01-01T00:00:00Z", revisions)


def send(receiver: Receiver, first: int, last: int, payload: bytes | None = None) -> None:
    """`delta FIRST LAST` with `payload` (default: the chunk FIRST..LAST), which must be accepted."""
    result = receiver(f"delta {first} {last}", chunk(first, last).encode() if payload is None else payload)
    assert result.returncode == 0, result.stderr.decode()


def refused(receiver: Receiver, request: str, payload: bytes) -> str:
    """The one line of a refusal, once checked that it changed nothing."""
    def files() -> tuple[dict[str, bytes], bytes | None]:
        status = receiver.root / "status.json"
        return ({k: v for k, v in receiver.everything().items() if not k.endswith(".lock")},
                status.read_bytes() if status.exists() else None)

    before = files()
    result = receiver(request, payload)
    assert result.returncode == 1, result.stderr.decode()
    assert files() == before, "a refused chunk leaves nothing behind, nor a word in status.json"
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(ERROR), line
    return line.removeprefix(ERROR)


def snapshot(receiver: Receiver, day: int, revision: int) -> str:
    """A kept snapshot of `revision` (the name's date does not matter: retention goes by arrival)."""
    name = f"{CLUSTER}-202601{day:02d}T000000Z"
    result = receiver.send(name, revision=revision)
    assert result.returncode == 0, result.stderr.decode()
    return name


def stored(receiver: Receiver) -> set[str]:
    folder = receiver.root / "deltas"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def names(*ranges: tuple[int, int]) -> set[str]:
    """The chunks of `ranges` and their receipts."""
    stems = (deltalog.chunk_name(first, last).removesuffix(".delta") for first, last in ranges)
    return {f"{stem}{suffix}" for stem in stems for suffix in (".delta", ".receipt")}


def delta_next(receiver: Receiver) -> dict[str, object]:
    result = receiver("delta-next")
    assert result.returncode == 0, result.stderr.decode()
    (line,) = result.stdout.decode().splitlines()
    answer: dict[str, object] = json.loads(line)
    return answer


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path)


@pytest.fixture
def chained(receiver: Receiver) -> Receiver:
    """A kept snapshot of revision 10 and the chain after it up to revision 20."""
    snapshot(receiver, 1, 10)
    send(receiver, 11, 15)
    send(receiver, 16, 20)
    return receiver


# --- the chain --------------------------------------------------------------------------------------

def test_a_chain_starts_right_after_a_kept_snapshot_and_goes_on_contiguously(receiver: Receiver) -> None:
    snapshot(receiver, 1, 10)
    send(receiver, 11, 15)
    assert stored(receiver) == names((11, 15))
    send(receiver, 16, 16)
    assert stored(receiver) == names((11, 15), (16, 16))
    for first, last in ((11, 15), (16, 16)):
        path = receiver.root / "deltas" / deltalog.chunk_name(first, last)
        assert path.read_bytes() == chunk(first, last).encode()
        assert deltalog.decode(path.read_bytes()).first == first
    assert not list((receiver.root / ".incoming").iterdir()), "nothing is left in .incoming"


def test_status_records_the_newest_chunk(receiver: Receiver) -> None:
    snapshot(receiver, 1, 10)
    before = time.time()
    send(receiver, 11, 15)
    status = receiver.status()
    assert status["last_delta_revision"] == 15 and status["last_delta_chunk"] == deltalog.chunk_name(11, 15)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before))
    assert stamp <= status["last_delta_at"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    assert status["last_snapshot"] == f"{CLUSTER}-20260101T000000Z", "the snapshots' fields stay"


def test_each_chunk_gets_a_receipt_of_what_this_host_saw(receiver: Receiver) -> None:
    """Its own clock and its own sha256 (a chunk carries no hash), like a snapshot's receipt."""
    snapshot(receiver, 1, 10)
    payload = chunk(11, 15).encode()
    before = time.time()
    send(receiver, 11, 15, payload)
    receipt = json.loads((receiver.root / "deltas" / "0000000000000011-0000000000000015.receipt").read_text())
    assert receipt == {"format": 1, "name": deltalog.chunk_name(11, 15), "first": 11, "last": 15,
                       "arrived": receipt["arrived"], "arrived_at": receipt["arrived_at"],
                       "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    assert before <= receipt["arrived"] <= time.time()
    assert receipt["arrived_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(receipt["arrived"]))


@pytest.mark.parametrize(("first", "last", "message"), [
    (11, 15, "overlap: revisions 11..20 are archived already (next is 21)"),
    (18, 25, "overlap: revisions 18..20 are archived already (next is 21)"),
    (20, 20, "overlap: revisions 20..20 are archived already (next is 21)"),
    (22, 25, "gap: revisions 21..21 would be missing (next is 21; a new segment starts only right after a kept "
             "snapshot's revision)"),
    (40, 45, "gap: revisions 21..39 would be missing (next is 21; a new segment starts only right after a kept "
             "snapshot's revision)"),
])
def test_an_overlap_or_a_gap_is_refused_and_nothing_is_stored(chained: Receiver, first: int, last: int,
                                                              message: str) -> None:
    """11..15 starts right after the kept snapshot, but behind the chain's next revision: still an overlap."""
    assert refused(chained, f"delta {first} {last}", chunk(first, last).encode()) == message
    assert stored(chained) == names((11, 15), (16, 20))


def test_a_chunk_before_any_kept_snapshot_is_refused(receiver: Receiver) -> None:
    """Nothing to replay it onto; a snapshot set apart as bad is no start either."""
    start = "the chain starts at a kept snapshot's revision + 1"
    message = refused(receiver, "delta 1 5", chunk(1, 5).encode())
    assert start in message and message.endswith("(newest kept snapshot revisions: none)"), message
    assert receiver.send(f"{CLUSTER}-20260101T000000Z", verified=False, revision=99).returncode == 1
    message = refused(receiver, "delta 100 101", chunk(100, 101).encode())
    assert start in message and message.endswith("(newest kept snapshot revisions: none)"), message
    snapshot(receiver, 2, 10)
    message = refused(receiver, "delta 12 13", chunk(12, 13).encode())
    assert start in message and message.endswith("(newest kept snapshot revisions: 10)"), message
    assert not stored(receiver)


def test_a_new_segment_starts_right_after_a_newer_kept_snapshot(chained: Receiver) -> None:
    """After a gap the archiver could not fill (a leader change, the backup host out of reach), the chain goes on
    from the next snapshot; the older segment stays for restores from the older snapshots."""
    snapshot(chained, 2, 100)
    assert refused(chained, "delta 50 60", chunk(50, 60).encode()).startswith("gap: revisions 21..49 ")
    assert refused(chained, "delta 100 110", chunk(100, 110).encode()).startswith("gap: revisions 21..99 ")
    send(chained, 101, 110)
    assert stored(chained) == names((11, 15), (16, 20), (101, 110))
    assert refused(chained, "delta 21 30", chunk(21, 30).encode()) == \
        "overlap: revisions 21..110 are archived already (next is 111)"
    send(chained, 111, 111)
    assert delta_next(chained) == {"next": 112, "snapshot_revisions": [10, 100]}


# --- what the chunk says ---------------------------------------------------------------------------

@pytest.mark.parametrize(("request_", "payload", "message"), [
    ("delta 11 15", chunk(11, 14).encode(), "refusing chunk 11..15: its header says 11..14"),
    ("delta 11 14", chunk(11, 15).encode(), "refusing chunk 11..14: its header says 11..15"),
    ("delta 11 15", chunk(11, 15, cluster="other").encode(),
     "refusing chunk 11..15: it is of cluster 'other', this folder holds 'local'"),
    ("delta 11 15", chunk(11, 15, cluster="\x1b[31mlocal").encode(),
     "refusing chunk 11..15: it is of cluster ' [31mlocal', this folder holds 'local'"),
    ("delta 11 15", b"not a chunk\n", "refusing chunk 11..15: the header is not a JSON line"),
    ("delta 11 15", b"", "refusing chunk 11..15: not a delta chunk of format 1"),
    ("delta 11 15", chunk(11, 15).encode().replace(b'"rev":13', b'"rev":14'),
     "refusing chunk 11..15: line 4: revision 14 where 13 must follow (a gap or an overlap)"),
    ("delta 11 15", b"\n".join(chunk(11, 15).encode().splitlines()[:-1]),
     "refusing chunk 11..15: the revisions end at 14, the header says 15"),
    *(("delta 11 15", re.sub(rb'"at":[^,]+', b'"at":' + at, chunk(11, 15).encode(), count=1),
       f"refusing chunk 11..15: line 2: not a revision (at: {shown} is not a time)")
      for at, shown in ((b"NaN", "nan"), (b"Infinity", "inf"), (b"true", "True"), (b'"1767225611"', "'1767225611'"),
                        (b"-1", "-1"))),
])
def test_a_chunk_that_is_not_what_the_request_says_is_refused(receiver: Receiver, request_: str, payload: bytes,
                                                              message: str) -> None:
    """Each would be the chain's next link after the kept snapshot of revision 10."""
    snapshot(receiver, 1, 10)
    assert refused(receiver, request_, payload) == message
    assert not stored(receiver)


def test_a_chunk_over_the_size_bound_is_refused(receiver: Receiver) -> None:
    snapshot(receiver, 1, 10)
    value = b"x" * 6_000_000
    padding = deltalog.MAX_CHUNK_BYTES - len(chunk(11, 11, member="", value=value).encode())
    at_bound = chunk(11, 11, member="m" * padding, value=value).encode()
    over = chunk(11, 11, member="m" * (padding + 1), value=value).encode()
    assert (len(at_bound), len(over)) == (deltalog.MAX_CHUNK_BYTES, deltalog.MAX_CHUNK_BYTES + 1)
    assert refused(receiver, "delta 11 11", over) == f"chunk 11..11 is larger than {deltalog.MAX_CHUNK_BYTES} bytes"
    assert not list((receiver.root / ".incoming").iterdir())
    send(receiver, 11, 11, at_bound)
    assert stored(receiver) == names((11, 11))


@pytest.fixture(scope="module")
def with_a_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Receiver:
    """Where `delta 11 15` with the chunk 11..15 would be accepted."""
    receiver = Receiver(tmp_path_factory.mktemp("hostile"))
    snapshot(receiver, 1, 10)
    return receiver


@pytest.mark.parametrize("words", ["../11 15", "11 ../15", "-11 15", "+11 15", "11 +15", "1e1 15", "0x0b 15",
                                   "1_1 15", "\uff11\uff11 15", "\u0661\u0661 15", "1" * 30 + " 15", "11 " + "9" * 20])
def test_a_hostile_revision_in_the_request_is_refused(with_a_snapshot: Receiver, words: str) -> None:
    """Python's int() reads "+11", "1_1" and digits of other scripts as 11: only ASCII digits, at most 19."""
    message = refused(with_a_snapshot, f"delta {words}", chunk(11, 15).encode())
    assert message.startswith("refusing delta revision ") and message.endswith(
        ": FIRST and LAST are 1 to 19 decimal digits"), message
    assert not stored(with_a_snapshot)


@pytest.mark.parametrize("request_", ["delta", "delta 11", "delta 11 15 16", "delta-next now", "DELTA 11 15"])
def test_other_delta_requests_are_refused(with_a_snapshot: Receiver, request_: str) -> None:
    result = with_a_snapshot(request_, chunk(11, 15).encode())
    assert result.returncode == 1 and result.stderr.startswith(f"{ERROR}refusing request ".encode()), result.stderr
    assert not stored(with_a_snapshot)


# --- delta-next and retention ------------------------------------------------------------------------

def test_delta_next_says_where_the_chain_goes_on(receiver: Receiver) -> None:
    """A chunk whose receipt is missing counts all the same: it is on disk, a restore can read it."""
    assert delta_next(receiver) == {"next": None, "snapshot_revisions": []}
    snapshot(receiver, 1, 10)
    assert delta_next(receiver) == {"next": None, "snapshot_revisions": [10]}
    send(receiver, 11, 15)
    assert delta_next(receiver) == {"next": 16, "snapshot_revisions": [10]}
    (receiver.root / "deltas" / "0000000000000011-0000000000000015.receipt").unlink()
    assert delta_next(receiver) == {"next": 16, "snapshot_revisions": [10]}
    assert refused(receiver, "delta 11 15", chunk(11, 15).encode()).startswith("overlap: ")


def test_delta_next_and_a_refusal_list_the_newest_kept_snapshot_revisions(receiver: Receiver) -> None:
    """More snapshots than retention keeps, filed as by an earlier receiver (retention is not the point here);
    metadata without a whole revision starts nothing."""
    receiver.root.mkdir(parents=True)
    for day in range(60):
        name = f"{CLUSTER}-2025{day // 28 + 1:02d}{day % 28 + 1:02d}T000000Z"
        (receiver.root / f"{name}.json").write_text(json.dumps({"name": name, "revision": 1000 - 10 * day}))
    for i, revision in enumerate(["2000", 2000.0, True, -5, None]):
        (receiver.root / f"{CLUSTER}-202604{i + 1:02d}T000000Z.json").write_text(json.dumps({"revision": revision}))
    (receiver.root / "bad").mkdir()
    (receiver.root / "bad" / f"{CLUSTER}-20260501T000000Z.json").write_text(json.dumps({"revision": 3000}))
    assert delta_next(receiver) == {"next": None, "snapshot_revisions": list(range(510, 1001, 10))}
    message = refused(receiver, "delta 2001 2001", chunk(2001, 2001).encode())
    assert message.endswith("(newest kept snapshot revisions: 960, 970, 980, 990, 1000)"), message
    send(receiver, 411, 412)  # 410 is kept too, if not among the newest 50


def test_retention_drops_the_chunks_no_kept_snapshot_can_use_and_keeps_the_others(receiver: Receiver) -> None:
    """docs/backups.md: chunks ending at or before the oldest kept snapshot's revision go when a snapshot is filed."""
    oldest = snapshot(receiver, 1, 10)
    receiver.arrived_at(oldest, days_ago(5, 1))
    for first, last in ((11, 15), (16, 20), (21, 25)):
        send(receiver, first, last)
    (receiver.root / "deltas" / "0000000000000011-0000000000000015.receipt").unlink()  # counts all the same
    for day, (days, revision) in enumerate(((3, 20), (2, 30), (1, 40)), start=2):
        receiver.arrived_at(snapshot(receiver, day, revision), days_ago(days, 1))
    assert receiver.kept() == {oldest, *(f"{CLUSTER}-2026010{d}T000000Z" for d in (2, 3, 4))}
    assert stored(receiver) == names((11, 15), (16, 20), (21, 25)) - {"0000000000000011-0000000000000015.receipt"}
    snapshot(receiver, 5, 50)  # today: the snapshot of revision 10 is neither among the newest 4 nor a day's first
    assert oldest not in receiver.kept() and len(receiver.kept()) == 4
    assert stored(receiver) == names((21, 25)), "16..20 ends at the oldest kept snapshot's revision: it goes too"
    assert delta_next(receiver) == {"next": 26, "snapshot_revisions": [20, 30, 40, 50]}
    send(receiver, 26, 26)


def test_retention_keeps_every_chunk_while_no_kept_snapshot_says_its_revision(receiver: Receiver) -> None:
    snapshot(receiver, 1, 10)
    send(receiver, 11, 15)
    (receiver.root / f"{CLUSTER}-20260101T000000Z.json").write_text("{}")  # as if its revision were unknown
    assert receiver.send(f"{CLUSTER}-20260102T000000Z").returncode == 0
    assert stored(receiver) == names((11, 15))


# --- the etcd hosts' client (destinations.Receiver) -----------------------------------------------------

@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> destinations.Receiver:
    """An etcd host's client whose `ssh` runs the receiver for tmp_path/backup-host/local (test_backup_agent's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    for name, value in (("PATH", f"{bin_dir}:{os.environ['PATH']}"), ("PYTHONPATH", str(ROOT)),
                        ("FAKE_ROOT", str(tmp_path / "backup-host" / CLUSTER)),
                        ("FAKE_SSH_LOG", str(tmp_path / "ssh.log"))):
        monkeypatch.setenv(name, value)
    return destinations.Receiver(BackupEnv(dest=SSH_DEST, cert="c", key="k", work_dir=str(tmp_path / "work"),
                                           ssh_key=str(tmp_path / "id")))


def test_the_client_sends_chunks_and_learns_where_the_chain_goes_on(
        client: destinations.Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backup_host = Receiver(tmp_path / "backup-host")
    snapshot(backup_host, 1, 10)
    assert client.delta_next(HISTORY) == (None, [10])
    client.delta(chunk(11, 15).encode(), 11, 15, HISTORY)
    assert stored(backup_host) == names((11, 15))
    assert client.delta_next(HISTORY) == (16, [10])
    with pytest.raises(DeltaRefused) as refusal:
        client.delta(chunk(11, 15).encode(), 11, 15, HISTORY)
    line = f"{ERROR}overlap: revisions 11..15 are archived already (next is 16)"
    assert refusal.value.stderr == line and refusal.value.code == 1
    assert str(refusal.value) == f"the backup host refused `delta 11 15` (exit 1): {line}", "for the archiver's log"
    assert line in capsys.readouterr().err, "the refusal reaches the journal as well"
    calls = (tmp_path / "ssh.log").read_text().splitlines()
    assert [c.split(" etcd-backup@192.0.2.1 ")[1] for c in calls] == ["delta-next", "delta 11 15", "delta-next",
                                                                      "delta 11 15"]


def stand_in_ssh(tmp_path: Path, script: str) -> None:
    """Replaces the client fixture's `ssh` (first on PATH)."""
    (tmp_path / "bin" / "ssh").write_text(f"#!/bin/sh\n{script}\n")


def test_a_backup_host_out_of_reach_is_no_refusal(client: destinations.Receiver, tmp_path: Path) -> None:
    """ssh's own failures exit 255: the chunk was not refused, sending it again may work."""
    stand_in_ssh(tmp_path, "echo 'ssh: connect to host 192.0.2.1 port 2222: Connection timed out' >&2; exit 255")
    with pytest.raises(UploadError) as failure:
        client.delta(chunk(11, 15).encode(), 11, 15, HISTORY)
    assert not isinstance(failure.value, DeltaRefused)
    assert failure.value.code == 255 and "Connection timed out" in failure.value.stderr
    with pytest.raises(UploadError):
        client.delta_next(HISTORY)


@pytest.mark.parametrize("answer", [
    "", "next 16", "[16, [10]]", '{"next": 16}', '{"next": "16", "snapshot_revisions": []}',
    '{"next": true, "snapshot_revisions": []}', '{"next": 16, "snapshot_revisions": 10}',
    '{"next": 16, "snapshot_revisions": [10.5]}', "[" * 100_000,
])
def test_an_answer_that_is_not_one_of_delta_next_is_an_upload_error(client: destinations.Receiver, tmp_path: Path,
                                                                    answer: str) -> None:
    (tmp_path / "answer").write_text(answer)
    stand_in_ssh(tmp_path, f"cat {tmp_path / 'answer'}")
    with pytest.raises(UploadError, match="answer to `delta-next` is not one"):
        client.delta_next(HISTORY)


def test_a_well_formed_answer_of_delta_next_is_taken_as_it_is(client: destinations.Receiver, tmp_path: Path) -> None:
    """The counterpart of the test above: the stand-in is not what fails there."""
    (tmp_path / "answer").write_text('{"next": null, "snapshot_revisions": [10, 20]}\n')
    stand_in_ssh(tmp_path, f"cat {tmp_path / 'answer'}")
    assert client.delta_next(HISTORY) == (None, [10, 20])
