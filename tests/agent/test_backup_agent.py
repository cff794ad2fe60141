"""Policies of the backup programs of the host agent: the backup host's receiver, the bucket uploads,
the backup run's metadata and status, and the verification.

The receiver runs as the backup host runs it (`python -m kcp_host etcd-backup-receive` with
SSH_ORIGINAL_COMMAND and the payload on stdin) against a temporary folder. Bucket uploads run
against stand-ins for `aws` and `gcloud` that log their arguments. The last tests take and verify
real snapshots of a throwaway etcd on loopback (skipped without etcd, etcdctl and openssl); the
integration tests do the same on the deployed hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kcp_host.contract import BackupEnv, ClusterEnv, render_env
from kcp_host.destinations import Bucket, object_metadata
from kcp_host.files import PIPE_BYTES
from tests.retention import expected_kept

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "local"
RECENT, DAILY = 4, 3


def agent(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "kcp_host", *args], input=stdin, env=full_env,
                          capture_output=True, timeout=120, check=False)


def snapshot_pair(name: str, verified: bool | None = True, **changes: Any) -> tuple[bytes, bytes]:
    """A .db and its metadata as etcd-backup writes them (the .db's content does not matter here)."""
    db = name.encode() * 100
    meta = {"format": 1, "name": name, "member": "h1", "sha256": hashlib.sha256(db).hexdigest(),
            "verified": verified, "verify_error": "" if verified is not False else "key count: recorded 2, found 1"}
    return db, json.dumps({**meta, **changes}).encode()


class Receiver:
    """The backup host's folder for cluster `local`, reached only through the forced command."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root / CLUSTER
        self.args = ["etcd-backup-receive", "--root", str(self.root), "--retain-recent", str(RECENT),
                     "--retain-daily", str(DAILY), *(["--max-bytes", str(max_bytes)] if max_bytes else [])]

    def __call__(self, request: str, payload: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return agent(*self.args, stdin=payload, SSH_ORIGINAL_COMMAND=request)

    def send(self, name: str, verified: bool | None = True, **changes: Any) -> subprocess.CompletedProcess[bytes]:
        db, meta = snapshot_pair(name, verified, **changes)
        assert self(f"put {name}.db", db).returncode == 0
        return self(f"put {name}.json", meta)

    def files(self, sub: str = "") -> set[str]:
        """The pairs' files (receipts apart)."""
        folder = self.root / sub
        return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                and p.suffix != ".receipt"} - {"status.json"}

    def kept(self) -> set[str]:
        """Names of the snapshots filed (the ones a restore lists)."""
        return {f.removesuffix(".json") for f in self.files() if f.endswith(".json")}

    def receipt(self, name: str, sub: str = "") -> dict[str, Any]:
        return json.loads((self.root / sub / f"{name}.receipt").read_text())

    def arrived_at(self, name: str, when: float) -> None:
        """Stand in for the passing days: the pair's receipt says it arrived `when` (the receiver reads no other
        record of arrival, and no client can write a receipt)."""
        path = self.root / f"{name}.receipt"
        path.write_text(json.dumps({**json.loads(path.read_text()), "arrived": when}))

    def everything(self) -> dict[str, bytes]:
        """Every file's content but status.json's, which changes with every request."""
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and p.name != "status.json"}

    def status(self) -> dict[str, Any]:
        return json.loads((self.root / "status.json").read_text())


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path)


def stamp(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


DAY = 86_400


def days_ago(days: int, hour: int) -> float:
    """`hour` o'clock UTC, `days` days before today."""
    return time.time() // DAY * DAY - days * DAY + hour * 3600


# --- the receiver ----------------------------------------------------------------------------------

def test_the_receiver_files_an_intact_verified_pair_and_records_it(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    result = receiver.send(name)
    assert result.returncode == 0, result.stderr
    assert receiver.files() == {f"{name}.db", f"{name}.json"} and not receiver.files("bad")
    assert (receiver.root / f"{name}.db").read_bytes() == snapshot_pair(name)[0]
    status = receiver.status()
    assert status["last_snapshot"] == name and status["last_success"] and status["last_verified"]
    assert not list((receiver.root / ".incoming").iterdir()), "nothing is left in .incoming"


def test_every_filed_pair_gets_a_receipt_of_what_this_host_saw(receiver: Receiver) -> None:
    """Its own clock and its own sha256, in a file no upload can name or replace."""
    name = f"{CLUSTER}-20260101T000000Z"
    before = time.time()
    assert receiver.send(name).returncode == 0
    receipt = receiver.receipt(name)
    db = snapshot_pair(name)[0]
    assert receipt["name"] == name and receipt["sha256"] == hashlib.sha256(db).hexdigest()
    assert receipt["bytes"] == len(db) and before <= receipt["arrived"] <= time.time()
    assert receipt["arrived_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(receipt["arrived"]))
    refused = receiver(f"put {name}.receipt", b'{"arrived": 1e12}')
    assert refused.returncode == 1 and b"refusing file name" in refused.stderr
    assert receiver.receipt(name) == receipt


def test_a_snapshot_arrives_through_a_pipe_the_receiver_widened(receiver: Receiver) -> None:
    """sshd hands the upload over a 64 KiB pipe; widened, a reader like this one took 1 GiB about 12 % sooner."""
    name = f"{CLUSTER}-20260101T000000Z"
    proc = subprocess.Popen([sys.executable, "-m", "kcp_host", *receiver.args], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                         "SSH_ORIGINAL_COMMAND": f"put {name}.db"})
    assert proc.stdin
    proc.stdin.write(snapshot_pair(name)[0])
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while (size := fcntl.fcntl(proc.stdin, fcntl.F_GETPIPE_SZ)) != PIPE_BYTES and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert size == PIPE_BYTES, f"the upload's pipe holds {size} bytes"


def test_a_snapshot_taken_without_verification_is_kept_but_never_counts_as_verified(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    assert receiver.send(name, verified=None).returncode == 0
    assert f"{name}.json" in receiver.files()
    assert receiver.status()["last_snapshot"] == name and "last_verified" not in receiver.status()


def test_the_receiver_never_replaces_a_file(receiver: Receiver) -> None:
    good, bad = f"{CLUSTER}-20260101T000000Z", f"{CLUSTER}-20260102T000000Z"
    receiver.send(good)
    receiver.send(bad, verified=False)
    receiver(f"put {CLUSTER}-20260103T000000Z.db", b"in progress")
    before = receiver.everything()
    for name in (f"{good}.db", f"{good}.json", f"{bad}.db", f"{bad}.json", f"{CLUSTER}-20260103T000000Z.db"):
        result = receiver(f"put {name}", b"replacement")
        assert result.returncode == 1 and b"never replaced" in result.stderr, (name, result.stderr)
    assert receiver.everything() == before


@pytest.mark.parametrize("name", [
    f"../{CLUSTER}-20260101T000000Z.db", f"bad/{CLUSTER}-20260101T000000Z.db", "/etc/passwd", "x.db",
    "other-20260101T000000Z.db", f"{CLUSTER}-20260101T000000Z.sh", f"{CLUSTER}-2026010T000000Z.db",
    f"{CLUSTER}-20260101T000000Z.db.db", f"{CLUSTER}-\uff12\uff10\uff12\uff160101T000000Z.db", "status.json", ".lock",
    f"{CLUSTER}-20260101T000000Z.receipt", f"{CLUSTER}-20261341T000000Z.db", f"{CLUSTER}-00000101T000000Z.db",
])
def test_the_receiver_refuses_every_other_name(receiver: Receiver, tmp_path: Path, name: str) -> None:
    result = receiver(f"put {name}", b"x")
    assert result.returncode == 1 and b"refusing file name" in result.stderr, result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in (".lock", "status.json")]


@pytest.mark.parametrize(("ahead", "accepted"), [(-400 * DAY, True), (0, True), (240, True), (360, False),
                                                 (400 * DAY, False)])
def test_a_name_stamped_more_than_5_minutes_ahead_of_the_receivers_clock_is_refused(
        receiver: Receiver, ahead: float, accepted: bool) -> None:
    name = f"{CLUSTER}-{stamp(time.time() + ahead)}"
    db, meta = snapshot_pair(name)
    result = receiver(f"put {name}.db", db)
    assert (result.returncode == 0) is accepted, result.stderr
    if not accepted:
        (line,) = result.stderr.decode().splitlines()
        assert line.startswith(f"etcd-backup-receive: ERROR: refusing {name}.db: stamped ") and \
            "ahead of the backup host's clock (at most 300s allowed); check the clocks" in line, line
        assert not list((receiver.root / ".incoming").iterdir())
        assert receiver(f"put {name}.json", meta).returncode == 1, "nor its metadata"


@pytest.mark.parametrize("request_", ["cat /etc/passwd", "get status.json", "put", f"put {CLUSTER}-a.db extra",
                                      "", "fail loudly", "rm -rf /", "PUT x.db"])
def test_the_receiver_refuses_requests_other_than_put_and_fail(receiver: Receiver, request_: str) -> None:
    result = receiver(request_, b"x")
    assert result.returncode == 1 and b"refusing request" in result.stderr, result.stderr


def test_an_oversized_upload_is_refused_and_leaves_nothing_behind(tmp_path: Path) -> None:
    small = Receiver(tmp_path, max_bytes=100)
    name = f"{CLUSTER}-20260101T000000Z.db"
    result = small(f"put {name}", b"x" * 101)
    assert result.returncode == 1 and b"larger than 100 bytes" in result.stderr, result.stderr
    assert not list((small.root / ".incoming").iterdir())
    assert small(f"put {name}", b"x" * 100).returncode == 0, "exactly the bound is accepted"


def test_metadata_larger_than_any_real_metadata_is_refused(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    receiver(f"put {name}.db", b"db")
    result = receiver(f"put {name}.json", b" " * (1 << 20) + b"{}")
    assert result.returncode == 1 and b"larger than" in result.stderr
    assert not receiver.files() and not receiver.files("bad")


def test_at_most_one_other_upload_waits_for_its_metadata(receiver: Receiver) -> None:
    """Uploads without their .json would otherwise fill the disk for a day, each up to --max-bytes."""
    names = [f"{CLUSTER}-2026010{day}T000000Z" for day in range(1, 6)]
    for name in names:
        assert receiver(f"put {name}.db", b"db").returncode == 0
    assert {p.name for p in (receiver.root / ".incoming").iterdir()} == {f"{n}.db" for n in names[-2:]}
    assert receiver(f"put {names[-2]}.json", snapshot_pair(names[-2])[1]).returncode == 1, "its .db is not the one"
    assert receiver.send(f"{CLUSTER}-20260201T000000Z").returncode == 0


def test_a_sha256_mismatch_is_set_apart_as_bad_and_fails_loudly(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    db, meta = snapshot_pair(name)
    receiver(f"put {name}.db", db[:-1])
    result = receiver(f"put {name}.json", meta)
    assert result.returncode == 1 and b"stored as bad" in result.stderr, result.stderr
    assert receiver.files("bad") == {f"{name}.db", f"{name}.json"} and not receiver.files()
    stored = json.loads((receiver.root / "bad" / f"{name}.json").read_text())
    assert stored["verified"] is False and "sha256" in stored["verify_error"]
    assert stored["name"] == name, "the rest of the metadata stays"
    assert receiver.receipt(name, "bad")["sha256"] == hashlib.sha256(db[:-1]).hexdigest()
    assert name in receiver.status()["last_failure_reason"]


def test_metadata_naming_another_snapshot_is_set_apart_as_bad(receiver: Receiver) -> None:
    """A restore reads the snapshot named inside the metadata: it must be the one filed with it."""
    real, other = f"{CLUSTER}-20260101T000000Z", f"{CLUSTER}-20260102T000000Z"
    receiver.send(real)
    db, meta = snapshot_pair(other)
    meta = json.dumps({**json.loads(meta), "name": real}).encode()  # intact, but naming the real one
    receiver(f"put {other}.db", db)
    result = receiver(f"put {other}.json", meta)
    assert result.returncode == 1 and b"its metadata names" in result.stderr, result.stderr
    assert receiver.kept() == {real} and receiver.files("bad") == {f"{other}.db", f"{other}.json"}


def test_a_snapshot_that_failed_verification_is_set_apart_as_bad(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    result = receiver.send(name, verified=False)
    assert result.returncode == 1 and b"failed verification on h1: key count" in result.stderr, result.stderr
    assert receiver.files("bad") == {f"{name}.db", f"{name}.json"} and not receiver.files()
    assert "last_snapshot" not in receiver.status()


@pytest.mark.parametrize("meta", [b"not json", b"[1, 2]", b"[" * 100_000, b'{"mode": 1, "path": "/etc/passwd"}'])
def test_hostile_metadata_is_set_apart_as_bad(receiver: Receiver, meta: bytes) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    receiver(f"put {name}.db", b"db")
    result = receiver(f"put {name}.json", meta)
    assert result.returncode == 1 and b"stored as bad" in result.stderr, result.stderr
    assert receiver.files("bad") == {f"{name}.db", f"{name}.json"}


def test_metadata_without_its_snapshot_files_nothing(receiver: Receiver) -> None:
    name = f"{CLUSTER}-20260101T000000Z"
    result = receiver(f"put {name}.json", snapshot_pair(name)[1])
    assert result.returncode == 1 and b"arrived without" in result.stderr
    assert not receiver.everything().keys() - {".lock"}


def test_a_snapshot_whose_metadata_never_came_is_dropped_after_a_day(receiver: Receiver) -> None:
    orphan = f"{CLUSTER}-20260101T000000Z.db"
    receiver(f"put {orphan}", b"db")
    day_old = time.time() - 86400 - 60
    os.utime(receiver.root / ".incoming" / orphan, (day_old, day_old))
    receiver.send(f"{CLUSTER}-20260102T000000Z")
    assert not list((receiver.root / ".incoming").iterdir())


def history(receiver: Receiver, days: range, hours: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """Real snapshots, `hours` o'clock on each of `days` (days ago, oldest first), as if they had arrived then;
    their names run backwards against time, so an order by name would be the wrong one. Then one today."""
    arrivals: dict[str, float] = {}
    for i, (day, hour) in enumerate((d, h) for d in days for h in hours):
        name = f"{CLUSTER}-20250101T00{59 - i:02d}00Z"
        assert receiver.send(name).returncode == 0
        receiver.arrived_at(name, days_ago(day, hour))
        arrivals[name] = days_ago(day, hour)
    today = f"{CLUSTER}-{stamp(time.time() - 60)}"
    assert receiver.send(today).returncode == 0
    arrivals[today] = receiver.receipt(today)["arrived"]
    return arrivals


def test_retention_keeps_the_newest_arrivals_and_the_first_arrival_of_each_newest_day(receiver: Receiver) -> None:
    arrivals = history(receiver, range(6, 0, -1))
    kept = receiver.kept()
    assert kept == expected_kept(arrivals, RECENT, DAILY)
    # the 4 newest (today's, then day -1: 03:00, 02:00, 01:00), and the first of today, day -1 and day -2
    by_time = sorted(arrivals, key=lambda n: arrivals[n])
    assert kept == {*by_time[-4:], by_time[-4 - 3]}, "day -2's first (01:00) as well"
    assert {f.removesuffix(".db") for f in receiver.files() if f.endswith(".db")} == kept
    assert {p.stem for p in receiver.root.glob("*.receipt")} == kept, "a pruned pair takes its receipt along"
    assert (receiver.status()["kept_recent"], receiver.status()["kept_daily"]) == (RECENT, DAILY)


def test_retention_counts_what_there_is_before_the_slots_fill(receiver: Receiver) -> None:
    receiver.send(f"{CLUSTER}-20260101T010000Z")
    receiver.arrived_at(f"{CLUSTER}-20260101T010000Z", days_ago(1, 1))
    receiver.send(f"{CLUSTER}-20260102T010000Z")
    assert (receiver.status()["kept_recent"], receiver.status()["kept_daily"]) == (2, 2)


def test_a_pair_filed_before_receipts_existed_arrived_when_its_metadata_was_written(receiver: Receiver) -> None:
    old = f"{CLUSTER}-99990101T000000Z"  # the earlier receiver took any stamp
    (receiver.root / "bad").mkdir(parents=True)
    db, meta = snapshot_pair(old)
    (receiver.root / f"{old}.db").write_bytes(db)
    (receiver.root / f"{old}.json").write_bytes(meta)
    os.utime(receiver.root / f"{old}.json", (days_ago(10, 1), days_ago(10, 1)))
    arrivals = history(receiver, range(3, 0, -1))
    assert receiver.kept() == expected_kept({**arrivals, old: days_ago(10, 1)}, RECENT, DAILY)
    assert old not in receiver.kept(), "the oldest arrival, and its day is no longer among the newest"


def test_bad_keeps_only_the_newest_three(receiver: Receiver) -> None:
    names = [f"{CLUSTER}-2026010{day}T000000Z" for day in range(1, 6)]
    for name in names:
        receiver.send(name, verified=False)
    assert receiver.files("bad") == {f"{n}{s}" for n in names[-3:] for s in (".db", ".json")}


def test_a_reported_failure_is_one_printable_line_in_status(receiver: Receiver) -> None:
    result = receiver("fail", b"h2: snapshot save failed: \x1b[31mboom\x07\nsecond line\n")
    assert result.returncode == 0, result.stderr
    status = receiver.status()
    assert status["last_failure_reason"] == "h2: snapshot save failed:  [31mboom " and status["last_failure"]
    assert receiver("fail", b"x" * 10_000).returncode == 0
    assert len(receiver.status()["last_failure_reason"]) == 4096


# --- the finding: a holder of the etcd hosts' key plants "newest" snapshots ---------------------------

def test_snapshots_planted_for_the_year_9999_are_refused_and_the_history_stays(receiver: Receiver) -> None:
    """Four snapshots named for 9999 with matching hashes and `verified: true`, as reported: the old receiver
    kept them as the newest, pruned every real snapshot, reported success, and a restore picked one."""
    arrivals = history(receiver, range(5, 0, -1))
    before, status = receiver.everything(), receiver.status()
    for i in range(4):
        name = f"{CLUSTER}-99991231T23595{i}Z"
        db, meta = snapshot_pair(name)
        for part, payload in ((".db", db), (".json", meta)):
            result = receiver(f"put {name}{part}", payload)
            assert result.returncode == 1 and b"ahead of the backup host's clock" in result.stderr, result.stderr
    assert receiver.everything() == before and receiver.status() == status, "nothing stored, nothing pruned"
    assert receiver.kept() == expected_kept(arrivals, RECENT, DAILY)


def test_a_flood_of_uploads_leaves_the_first_real_snapshot_of_each_day(receiver: Receiver) -> None:
    """Stamped now, the key holder's uploads are the newest arrivals and fill the `recent` slots; they cannot
    arrive on earlier days, so the real first snapshot of each of those days stays."""
    arrivals = history(receiver, range(5, 0, -1))
    day_of = {n: time.strftime("%Y%m%d", time.gmtime(at)) for n, at in arrivals.items()}
    firsts = {min((n for n in arrivals if day_of[n] == day), key=lambda n: arrivals[n])
              for day in sorted(set(day_of.values()))[-DAILY:]}
    flood = [f"{CLUSTER}-{stamp(time.time() - 3600 - i)}" for i in range(2 * RECENT)]
    for name in flood:
        assert receiver.send(name).returncode == 0
        arrivals[name] = receiver.receipt(name)["arrived"]
    kept = receiver.kept()
    assert kept == expected_kept(arrivals, RECENT, DAILY) and firsts <= kept, (sorted(kept), sorted(firsts))
    assert len(firsts) == DAILY, "today's first and the first of the two days before"


# --- bucket destinations, against stand-ins for the cloud CLIs ---------------------------------------

FAKE_CLI = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv) + "\\n")
if "/status/" in sys.argv[-1]:
    shutil.copy(sys.argv[-2], os.environ["FAKE_LOG"] + ".status.json")
"""


@pytest.fixture
def clouds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`aws` and `gcloud` that log each call as a JSON line in the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("aws", "gcloud"):
        (bin_dir / name).write_text(FAKE_CLI)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls"))
    return tmp_path / "calls"


def bucket_run(tmp_path: Path, dest: str, meta: dict[str, Any]) -> tuple[str, str]:
    """One snapshot stored as etcd-backup stores it; the paths of its two files."""
    backup = BackupEnv(dest=dest, cert="c", key="k", work_dir=str(tmp_path / "work"))
    db, js = tmp_path / f"{meta['name']}.db", tmp_path / f"{meta['name']}.json"
    db.write_bytes(b"db")
    js.write_text(json.dumps(meta))
    Bucket(backup).store(db, js, meta)
    return str(db), str(js)


META = {"name": "local-20260101T000000Z", "taken_at": "2026-01-01T00:00:00Z", "revision": 42, "keys": 7,
        "hashkv": 123, "sha256": "ab" * 32, "verified": True, "verify_error": "", "cluster_id": "0123456789abcdef"}


def test_every_object_version_carries_the_snapshots_metadata() -> None:
    assert object_metadata(META) == ("name=local-20260101T000000Z,taken-at=2026-01-01T00:00:00Z,revision=42,keys=7,"
                                     f"hashkv=123,sha256={'ab' * 32},verified=true,cluster-id=0123456789abcdef")
    assert "verified=null," in object_metadata({**META, "verified": None})


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line)[1:] for line in log.read_text().splitlines()] if log.exists() else []


def test_s3_gets_one_new_object_per_file_with_the_checksum_object_lock_needs(tmp_path: Path, clouds: Path) -> None:
    """No fixed key to overwrite, nothing per day: the bucket's lock and lifecycle keep the history."""
    tags = object_metadata(META)
    db, js = bucket_run(tmp_path, "s3://b/p/", META)
    cp = ["s3", "cp", "--only-show-errors", "--checksum-algorithm", "CRC32", "--metadata", tags]
    assert calls(clouds) == [[*cp, db, f"s3://b/p/snapshots/{META['name']}.db"],
                             [*cp, js, f"s3://b/p/snapshots/{META['name']}.json"]]


def test_gcs_creates_only_new_objects_and_never_replaces_one(tmp_path: Path, clouds: Path) -> None:
    """`--if-generation-match=0`: an object of that name exists already, the upload fails (the retention policy and
    the missing delete permission would refuse a replacement anyway)."""
    db, js = bucket_run(tmp_path, "gs://b/p", META)
    cp = ["storage", "cp", "--quiet", "--if-generation-match=0", f"--custom-metadata={object_metadata(META)}"]
    assert calls(clouds) == [[*cp, db, f"gs://b/p/snapshots/{META['name']}.db"],
                             [*cp, js, f"gs://b/p/snapshots/{META['name']}.json"]]


def test_a_snapshot_that_failed_verification_goes_to_bad_only(tmp_path: Path, clouds: Path) -> None:
    bucket_run(tmp_path, "s3://b/p", {**META, "verified": False})
    assert [c[-1] for c in calls(clouds)] == [f"s3://b/p/bad/{META['name']}.db", f"s3://b/p/bad/{META['name']}.json"]


def test_each_status_report_is_a_new_object(tmp_path: Path, clouds: Path) -> None:
    """A fixed status.json could not be replaced under GCS's retention policy; the newest object is the status."""
    status = tmp_path / "status.json"
    status.write_text("{}")
    Bucket(BackupEnv(dest="gs://b/p", cert="c", key="k", work_dir=str(tmp_path))).report(status, "h1: boom")
    (call,) = calls(clouds)
    assert call[:4] == ["storage", "cp", "--quiet", "--if-generation-match=0"] and call[-2] == str(status)
    assert re.fullmatch(rf"gs://b/p/status/[0-9]{{8}}T[0-9]{{6}}Z-{re.escape(socket.gethostname())}\.json",
                        call[-1]), call


# --- a backup run's status and failures (no etcd answers) -------------------------------------------

FAKE_SSH = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
while args[0] in ("-i", "-p", "-o"):
    args = args[2:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
os.environ["SSH_ORIGINAL_COMMAND"] = " ".join(args[1:])
os.execv(sys.executable, [sys.executable, "-m", "kcp_host", "etcd-backup-receive", "--root", os.environ["FAKE_ROOT"],
                          "--retain-recent", "4", "--retain-daily", "3"])
"""


SSH_DEST = f"ssh://etcd-backup@192.0.2.1:2222/srv/{CLUSTER}"


class EtcdHost:
    """An etcd host's settings for a backup run; `etcdctl` and the client URL say which etcd it asks."""

    def __init__(self, root: Path, client_url: str, etcdctl: str = "etcdctl", pki: Path | None = None,
                 dest: str = SSH_DEST, delta_seconds: int = 0) -> None:
        self.root, self.backup_host = root, root / "backup-host" / CLUSTER
        pki = pki or root
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / "ssh").write_text(FAKE_SSH)
        (root / "bin" / "ssh").chmod(0o755)
        cluster = ClusterEnv(
            cluster_name=CLUSTER, member_name="h1", peer_url="http://127.0.0.1:1", client_url=client_url,
            members=("h1=http://127.0.0.1:1",), client_endpoints=(client_url,), etcd_ca=str(pki / "ca.crt"),
            etcd_cert=str(pki / "c.crt"), etcd_key=str(pki / "c.key"), data_dir=str(root / "data"), etcdctl=etcdctl,
            restore_dir=str(root / "restore"))
        backup = BackupEnv(dest=dest, cert=str(pki / "c.crt"),
                           key=str(pki / "c.key"), work_dir=str(root / "work"), ssh_key=str(root / "id"),
                           delta_seconds=delta_seconds)
        (root / "cluster.env").write_text(render_env(cluster, "unit test"))
        (root / "backup.env").write_text(render_env(backup, "unit test"))

    def run(self, subcommand: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return agent(subcommand, *args, PATH=f"{self.root / 'bin'}:{os.environ['PATH']}",
                     KCP_CLUSTER_ENV=str(self.root / "cluster.env"), KCP_BACKUP_ENV=str(self.root / "backup.env"),
                     FAKE_ROOT=str(self.backup_host), FAKE_SSH_LOG=str(self.root / "ssh.log"))

    def status(self) -> dict[str, Any]:
        return json.loads((self.root / "work" / "status.json").read_text())


def test_a_run_that_cannot_reach_its_member_fails_and_tells_the_backup_host(tmp_path: Path) -> None:
    refusing = tmp_path / "etcdctl"
    refusing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('Error: context deadline exceeded')\n")
    refusing.chmod(0o755)
    host = EtcdHost(tmp_path, "https://127.0.0.1:1", etcdctl=str(refusing))
    result = host.run("etcd-backup")
    assert result.returncode == 1, result.stderr
    assert b"etcd-backup: FAILED: cannot read the status of the local member" in result.stderr, result.stderr
    reason = host.status()["last_failure_reason"]
    assert "context deadline exceeded" in reason and host.status()["last_failure"]
    (call,) = (tmp_path / "ssh.log").read_text().splitlines()
    assert call.startswith(f"-i {tmp_path / 'id'} -p 2222 ") and call.endswith(" etcd-backup@192.0.2.1 fail"), call
    received = json.loads((host.backup_host / "status.json").read_text())
    assert received["last_failure_reason"] == f"h1: {reason}", "the backup host knows of the failure too"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    host = EtcdHost(tmp_path, "https://127.0.0.1:1")
    assert host.run("etcd-backup", "--bogus").returncode == 2
    assert host.run("etcd-backup-verify", "--update", str(tmp_path / "x.db")).returncode == 2
    assert host.run("etcd-backup-verify", str(tmp_path / "x.db"), str(tmp_path / "missing.json")).returncode == 2


# --- real snapshots of a throwaway etcd on loopback ---------------------------------------------------

def free_ports() -> tuple[int, int]:
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        return one.getsockname()[1], two.getsockname()[1]


@contextlib.contextmanager
def running_etcd(root: Path, keys: int) -> Iterator[str]:
    """A single-member etcd on plain HTTP holding `keys` keys, and a certificate in `root` (etcdctl loads it but
    does not use it on http://); its client URL."""
    missing = [tool for tool in ("etcd", "etcdctl", "openssl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(reason=f"needs {', '.join(missing)} on PATH to take real snapshots (`apt-get install etcd-server "
                           "etcd-client openssl`)")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(root / "c.key"), "-out", str(root / "c.crt"), "-days", "1", "-subj", "/CN=t"],
                   check=True, capture_output=True)
    shutil.copy(root / "c.crt", root / "ca.crt")
    client, peer = (f"http://127.0.0.1:{port}" for port in free_ports())
    with (root / "etcd.log").open("wb") as log:
        etcd = subprocess.Popen(["etcd", "--name", "t", "--data-dir", str(root / "data"),
                                 "--listen-client-urls", client, "--advertise-client-urls", client,
                                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                 "--initial-cluster", f"t={peer}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        ctl = ["etcdctl", f"--endpoints={client}"]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctl, "endpoint", "health"], capture_output=True, check=False).returncode != 0:
            assert time.monotonic() < deadline and etcd.poll() is None, (root / "etcd.log").read_text()
            time.sleep(0.2)
        for i in range(keys):
            subprocess.run([*ctl, "put", f"/k{i}", f"v{i}"], capture_output=True, check=True)
        yield client
    finally:
        etcd.terminate()
        etcd.wait(timeout=10)


@pytest.fixture(scope="module")
def live_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("etcd")
    with running_etcd(root, 20) as client:
        yield client, root


def test_a_new_cluster_that_never_held_a_key_backs_up_verified(tmp_path: Path) -> None:
    """Its snapshot says revision 0, the restored store serves revision 1: the first backups of a new cluster
    (before Kubernetes writes) must not be set apart as failed."""
    (tmp_path / "etcd").mkdir()
    with running_etcd(tmp_path / "etcd", 0) as client:
        (tmp_path / "host").mkdir()
        host = EtcdHost(tmp_path / "host", client, pki=tmp_path / "etcd")
        done = host.run("etcd-backup")
    assert done.returncode == 0, done.stderr.decode()
    meta = json.loads((host.backup_host / f"{host.status()['last_snapshot']}.json").read_text())
    assert (meta["verified"], meta["revision"], meta["keys"]) == (True, 1, 0), meta


@pytest.fixture
def etcd_host(live_etcd: tuple[str, Path], tmp_path: Path) -> EtcdHost:
    client, pki = live_etcd
    return EtcdHost(tmp_path, client, pki=pki)


def test_a_run_takes_a_verified_snapshot_and_files_it_on_the_backup_host(etcd_host: EtcdHost) -> None:
    first = etcd_host.run("etcd-backup")
    assert first.returncode == 0, first.stderr.decode()
    assert b"etcd-backup: OK: " in first.stderr and b"stored at ssh://" in first.stderr
    name = etcd_host.status()["last_snapshot"]
    meta = json.loads((etcd_host.backup_host / f"{name}.json").read_text())
    assert meta["verified"] is True and meta["verify_error"] == "" and meta["keys"] == 20, meta
    assert set(meta) == {"format", "name", "cluster", "taken_at", "member", "etcd_version", "revision", "cluster_id",
                         "keys", "hashkv", "compact_revision", "total_keys", "snapshot_hash", "size", "sha256",
                         "snapshot_seconds", "verified", "verified_at", "verify_seconds", "verify_error"}
    assert meta["sha256"] == hashlib.sha256((etcd_host.backup_host / f"{name}.db").read_bytes()).hexdigest()
    assert etcd_host.status()["last_verified"] and "last_failure" not in etcd_host.status()
    time.sleep(1)  # names have one-second resolution
    assert etcd_host.run("etcd-backup").returncode == 0
    newest = etcd_host.status()["last_snapshot"]
    assert newest != name
    kept = {p.name for p in (etcd_host.root / "work").iterdir() if not p.name.startswith(".")}
    assert kept == {f"{newest}.db", f"{newest}.json", "status.json"}, "only the newest snapshot stays on the host"
    assert not [p for p in (etcd_host.root / "work").iterdir() if p.name.startswith("verify.")]


def test_verification_catches_a_wrong_recorded_key_count_and_cleans_up(etcd_host: EtcdHost) -> None:
    assert etcd_host.run("etcd-backup", "--no-upload").returncode == 0
    work = etcd_host.root / "work"
    name = etcd_host.status()["last_snapshot"]
    wrong = work / "wrong.json"
    wrong.write_text(json.dumps({**json.loads((work / f"{name}.json").read_text()), "keys": 21}))
    result = etcd_host.run("etcd-backup-verify", "--update", str(work / f"{name}.db"), str(wrong))
    assert result.returncode == 1, result.stderr
    assert b"etcd-backup-verify: FAILED: " in result.stderr
    meta = json.loads(wrong.read_text())
    assert meta["verified"] is False and meta["verify_error"] == "key count: recorded 21, found 20", meta
    assert not [p for p in work.iterdir() if p.name.startswith("verify.")], "scratch dir (and its sockets) left behind"
    running = subprocess.run(["pgrep", "-f", "--", f"--data-dir {work}/verify[.]"], capture_output=True, check=False)
    assert running.returncode == 1, f"the throwaway etcd still runs: {running.stdout!r}"


def test_the_throwaway_etcd_listens_on_sockets_only_root_reaches_never_on_a_port(etcd_host: EtcdHost) -> None:
    """It serves the whole snapshot without TLS: on 127.0.0.1 any local user could read every secret through it."""
    stand_in = etcd_host.root / "bin" / "etcd"  # a stand-in that records where the real one would listen
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" > {etcd_host.root}/etcd-args\n'
                        f'stat -c %a . > {etcd_host.root}/etcd-cwd-mode\nexit 1\n')
    stand_in.chmod(0o755)
    assert etcd_host.run("etcd-backup", "--no-upload").returncode == 1
    args = (etcd_host.root / "etcd-args").read_text().split()
    urls = [args[i + 1] for i, a in enumerate(args) if a.endswith("-urls") and "metrics" not in a]
    assert urls and all(url.startswith("unix://") and "/" not in url.removeprefix("unix://") for url in urls), urls
    assert (etcd_host.root / "etcd-cwd-mode").read_text().strip() == "700", "sockets live in a private folder"


def test_a_snapshot_that_fails_verification_goes_to_bad_and_fails_the_run(etcd_host: EtcdHost) -> None:
    stand_in = etcd_host.root / "bin" / "etcd"  # a throwaway etcd that cannot start: verification cannot pass
    stand_in.write_text("#!/bin/sh\necho 'etcd stand-in: cannot start' >&2\nexit 1\n")
    stand_in.chmod(0o755)
    result = etcd_host.run("etcd-backup")
    assert result.returncode == 1, result.stderr
    assert b"did not become healthy" in result.stderr and b"stored as bad" in result.stderr, result.stderr
    (bad,) = {p.stem for p in (etcd_host.backup_host / "bad").glob("*.json")}
    assert json.loads((etcd_host.backup_host / "bad" / f"{bad}.json").read_text())["verified"] is False
    reason = etcd_host.status()["last_failure_reason"]
    assert reason.startswith(f"snapshot {bad} failed verification: throwaway etcd did not become healthy: etcd "
                             "stand-in: cannot start"), reason


def test_a_bucket_gets_status_json_as_this_run_wrote_it(live_etcd: tuple[str, Path], tmp_path: Path,
                                                        clouds: Path) -> None:
    client, pki = live_etcd
    host = EtcdHost(tmp_path, client, pki=pki, dest="s3://b/p")
    result = host.run("etcd-backup")
    assert result.returncode == 0, result.stderr.decode()
    published = json.loads(Path(f"{clouds}.status.json").read_text())
    first = calls(clouds)[0]
    assert first[-1] == f"s3://b/p/snapshots/{published['last_snapshot']}.db"
    assert f"name={published['last_snapshot']}," in first[first.index("--metadata") + 1]
    assert published == host.status(), "the run's own outcome, not the previous one"
    assert "/status/" in calls(clouds)[-1][-1], "status goes last"


def test_commands_that_read_a_whole_database_get_time_in_proportion_to_its_size() -> None:
    """A fixed 60 s failed the snapshot of a 4 GiB database (etcd's quota here is 8 GiB)."""
    from kcp_host.etcd import size_timeout
    assert size_timeout(0) == "60s" and size_timeout(100 << 20) == "60s"
    assert size_timeout(4 << 30) == "204s" and size_timeout(8 << 30) == "409s"
    assert size_timeout(100 << 20, floor_seconds=30) == "30s"
