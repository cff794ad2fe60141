"""Policies of the backup programs of the host agent: the backup host's receiver, the bucket uploads,
the backup run's metadata and status, and the verification.

The receiver runs as the backup host runs it (`python -m kcp_host etcd-backup-receive` with
SSH_ORIGINAL_COMMAND and the payload on stdin) against a temporary folder. Bucket uploads run
against stand-ins for `aws` and `gcloud` that log their arguments. The last tests take and verify
real snapshots of a throwaway etcd on loopback (skipped without etcd, etcdctl and openssl); the
integration tests do the same on the deployed hosts.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        folder = self.root / sub
        return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} - {"status.json"}

    def everything(self) -> dict[str, bytes]:
        """Every file's content but status.json's, which changes with every request."""
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and p.name != "status.json"}

    def status(self) -> dict[str, Any]:
        return json.loads((self.root / "status.json").read_text())


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path)


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
])
def test_the_receiver_refuses_every_other_name(receiver: Receiver, tmp_path: Path, name: str) -> None:
    result = receiver(f"put {name}", b"x")
    assert result.returncode == 1 and b"refusing file name" in result.stderr, result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in (".lock", "status.json")]


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
    assert name in receiver.status()["last_failure_reason"]


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


def expected_kept(names: list[str]) -> set[str]:
    """docs/backups.md: the newest RECENT, plus the first snapshot of each of the newest DAILY UTC days."""
    first_of_day: dict[str, str] = {}
    for name in sorted(names):
        first_of_day.setdefault(name.split("-")[1][:8], name)
    days = sorted(first_of_day, reverse=True)[:DAILY]
    return set(sorted(names, reverse=True)[:RECENT]) | {first_of_day[d] for d in days}


def test_retention_keeps_exactly_the_newest_and_the_first_of_each_newest_day(receiver: Receiver) -> None:
    offered = [f"{CLUSTER}-202601{day:02d}T{hour:02d}0000Z" for day in range(1, 7) for hour in (1, 2, 3)]
    for name in offered:
        assert receiver.send(name).returncode == 0
    kept = {f.removesuffix(".json") for f in receiver.files() if f.endswith(".json")}
    assert kept == expected_kept(offered)
    # 4 newest (day 6: 3 runs, day 5: 03:00) plus the first of days 6, 5 and 4.
    assert kept == {f"{CLUSTER}-20260106T{h}0000Z" for h in ("01", "02", "03")} | {
        f"{CLUSTER}-20260105T030000Z", f"{CLUSTER}-20260105T010000Z", f"{CLUSTER}-20260104T010000Z"}
    assert {f.removesuffix(".db") for f in receiver.files() if f.endswith(".db")} == kept
    assert (receiver.status()["kept_recent"], receiver.status()["kept_daily"]) == (RECENT, DAILY)


def test_retention_counts_what_there_is_before_the_slots_fill(receiver: Receiver) -> None:
    receiver.send(f"{CLUSTER}-20260101T010000Z")
    receiver.send(f"{CLUSTER}-20260102T010000Z")
    assert (receiver.status()["kept_recent"], receiver.status()["kept_daily"]) == (2, 2)


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


# --- bucket destinations, against stand-ins for the cloud CLIs ---------------------------------------

FAKE_CLI = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv) + "\\n")
if sys.argv[-1].endswith("/status.json"):
    shutil.copy(sys.argv[-2], os.environ["FAKE_LOG"] + ".status.json")
if "--if-none-match" in sys.argv or "--if-generation-match=0" in sys.argv:
    marker = os.path.join(os.path.dirname(os.environ["FAKE_LOG"]), "marker-exists")
    if os.path.exists(marker):
        sys.exit(1)
    open(marker, "w").close()
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


def bucket_run(tmp_path: Path, dest: str, meta: dict[str, Any]) -> None:
    backup = BackupEnv(dest=dest, cert="c", key="k", work_dir=str(tmp_path / "work"))
    (tmp_path / "s.db").write_bytes(b"db")
    (tmp_path / "s.json").write_text(json.dumps(meta))
    Bucket(backup).store(tmp_path / "s.db", tmp_path / "s.json", meta)


META = {"name": "local-20260101T000000Z", "taken_at": "2026-01-01T00:00:00Z", "revision": 42, "keys": 7,
        "hashkv": 123, "sha256": "ab" * 32, "verified": True, "verify_error": ""}


def test_every_object_version_carries_the_snapshots_metadata() -> None:
    assert object_metadata(META) == ("name=local-20260101T000000Z,taken-at=2026-01-01T00:00:00Z,revision=42,keys=7,"
                                     f"hashkv=123,sha256={'ab' * 32},verified=true")
    assert object_metadata({**META, "verified": None}).endswith("verified=null")


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line)[1:] for line in log.read_text().splitlines()] if log.exists() else []


def test_s3_first_verified_snapshot_of_the_day_goes_to_recent_and_daily(tmp_path: Path, clouds: Path) -> None:
    tags = object_metadata(META)
    bucket_run(tmp_path, "s3://b/p/", META)
    db, js = str(tmp_path / "s.db"), str(tmp_path / "s.json")
    marker = ["s3api", "put-object", "--if-none-match", "*", "--bucket", "b",
              "--key", f"p/daily-markers/{time.strftime('%Y-%m-%d', time.gmtime())}", "--body",
              str(tmp_path / "work" / ".daily-marker")]
    assert calls(clouds) == [
        ["s3", "cp", "--only-show-errors", "--metadata", tags, db, "s3://b/p/recent/snapshot.db"],
        ["s3", "cp", "--only-show-errors", "--metadata", tags, js, "s3://b/p/recent/snapshot.json"],
        marker,
        ["s3", "cp", "--only-show-errors", "--metadata", tags, db, "s3://b/p/daily/snapshot.db"],
        ["s3", "cp", "--only-show-errors", "--metadata", tags, js, "s3://b/p/daily/snapshot.json"]]
    assert (tmp_path / "work" / ".daily-marker").read_text() == f"{META['name']}\n"
    clouds.unlink()
    bucket_run(tmp_path, "s3://b/p", META)
    assert [c[-1] for c in calls(clouds)] == ["s3://b/p/recent/snapshot.db", "s3://b/p/recent/snapshot.json",
                                              marker[-1]], "the day's marker exists: no second daily"


def test_gcs_uses_the_same_keys_and_a_create_only_marker(tmp_path: Path, clouds: Path) -> None:
    bucket_run(tmp_path, "gs://b/p", META)
    made = calls(clouds)
    assert [c[-1] for c in made] == ["gs://b/p/recent/snapshot.db", "gs://b/p/recent/snapshot.json",
                                     f"gs://b/p/daily-markers/{time.strftime('%Y-%m-%d', time.gmtime())}",
                                     "gs://b/p/daily/snapshot.db", "gs://b/p/daily/snapshot.json"]
    assert all(c[:3] == ["storage", "cp", "--quiet"] and f"--custom-metadata={object_metadata(META)}" in c
               for c in made)
    assert [c for c in made if "--if-generation-match=0" in c] == [made[2]]


def test_a_snapshot_that_failed_verification_goes_to_bad_only(tmp_path: Path, clouds: Path) -> None:
    bucket_run(tmp_path, "s3://b/p", {**META, "verified": False})
    assert [c[-1] for c in calls(clouds)] == ["s3://b/p/bad/snapshot.db", "s3://b/p/bad/snapshot.json"]


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
                 verify_ports: tuple[int, int] = (23790, 23800), dest: str = SSH_DEST) -> None:
        self.root, self.backup_host, self.verify_port = root, root / "backup-host" / CLUSTER, verify_ports[0]
        pki = pki or root
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / "ssh").write_text(FAKE_SSH)
        (root / "bin" / "ssh").chmod(0o755)
        cluster = ClusterEnv(
            cluster_name=CLUSTER, member_name="h1", peer_url="http://127.0.0.1:1", client_url=client_url,
            members=("h1=http://127.0.0.1:1",), client_endpoints=(client_url,), etcd_ca=str(pki / "ca.crt"),
            etcd_cert=str(pki / "c.crt"), etcd_key=str(pki / "c.key"), data_dir=str(root / "data"), etcdctl=etcdctl)
        backup = BackupEnv(dest=dest, cert=str(pki / "c.crt"),
                           key=str(pki / "c.key"), work_dir=str(root / "work"), ssh_key=str(root / "id"),
                           verify_client_port=verify_ports[0], verify_peer_port=verify_ports[1])
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


@pytest.fixture(scope="module")
def live_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A single-member etcd on plain HTTP (etcdctl loads the certificates but does not use them on http://)."""
    missing = [tool for tool in ("etcd", "etcdctl", "openssl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(reason=f"needs {', '.join(missing)} on PATH to take real snapshots (`apt-get install etcd-server "
                           "etcd-client openssl`)")
    root = tmp_path_factory.mktemp("etcd")
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
        for i in range(20):
            subprocess.run([*ctl, "put", f"/k{i}", f"v{i}"], capture_output=True, check=True)
        yield client, root
    finally:
        etcd.terminate()
        etcd.wait(timeout=10)


@pytest.fixture
def etcd_host(live_etcd: tuple[str, Path], tmp_path: Path) -> EtcdHost:
    client, pki = live_etcd
    return EtcdHost(tmp_path, client, pki=pki, verify_ports=free_ports())


def test_a_run_takes_a_verified_snapshot_and_files_it_on_the_backup_host(etcd_host: EtcdHost) -> None:
    first = etcd_host.run("etcd-backup")
    assert first.returncode == 0, first.stderr.decode()
    assert b"etcd-backup: OK: " in first.stderr and b"stored at ssh://" in first.stderr
    name = etcd_host.status()["last_snapshot"]
    meta = json.loads((etcd_host.backup_host / f"{name}.json").read_text())
    assert meta["verified"] is True and meta["verify_error"] == "" and meta["keys"] == 20, meta
    assert set(meta) == {"format", "name", "cluster", "taken_at", "member", "etcd_version", "revision", "keys",
                         "hashkv", "total_keys", "snapshot_hash", "size", "sha256", "snapshot_seconds", "verified",
                         "verified_at", "verify_seconds", "verify_error"}
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
    assert not [p for p in work.iterdir() if p.name.startswith("verify.")], "scratch dir left behind"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", etcd_host.verify_port)) != 0, "the throwaway etcd still runs"


def test_a_snapshot_that_fails_verification_goes_to_bad_and_fails_the_run(etcd_host: EtcdHost) -> None:
    with socket.socket() as squatter:  # the throwaway's port is taken: verification cannot run
        squatter.bind(("127.0.0.1", etcd_host.verify_port))
        squatter.listen()
        result = etcd_host.run("etcd-backup")
    assert result.returncode == 1, result.stderr
    assert b"in use" in result.stderr and b"stored as bad" in result.stderr, result.stderr
    (bad,) = {p.stem for p in (etcd_host.backup_host / "bad").glob("*.json")}
    assert json.loads((etcd_host.backup_host / "bad" / f"{bad}.json").read_text())["verified"] is False
    reason = etcd_host.status()["last_failure_reason"]
    assert reason.startswith(f"snapshot {bad} failed verification: port 127.0.0.1:") and "in use" in reason, reason


def test_a_bucket_gets_status_json_as_this_run_wrote_it(live_etcd: tuple[str, Path], tmp_path: Path,
                                                        clouds: Path) -> None:
    client, pki = live_etcd
    host = EtcdHost(tmp_path, client, pki=pki, verify_ports=free_ports(), dest="s3://b/p")
    result = host.run("etcd-backup")
    assert result.returncode == 0, result.stderr.decode()
    published = json.loads(Path(f"{clouds}.status.json").read_text())
    first = calls(clouds)[0]
    assert first[-1] == "s3://b/p/recent/snapshot.db" and f"name={published['last_snapshot']}," in first[4]
    assert published == host.status(), "the run's own outcome, not the previous one"
    assert [c[-1] for c in calls(clouds)][-1] == "s3://b/p/status.json", "status.json goes last"
