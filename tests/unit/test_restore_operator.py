"""Policies of the operator's side of a restore (components/restore/) and of the one stack file reader.

Which snapshot a restore picks, what the members are told about the bytes they received, how one
slow or dead member affects the others, where the plan's hosts, users and folders come from,
and the facts the preview workflow reads. The last tests run the real host side
(`kcp-host etcd-restore-member restore`, up to `switch`) against the operator's stream, so both ends of the
wire protocol are checked together.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.restore import RestoreError
from components.restore.members import agent_command
from components.restore.plan import Plan, build_plan, parser
from components.restore.sources import BackupFolder, pick_backup
from components.restore.ssh import Ssh
from components.restore.stream import CHUNK, QUEUE_DEPTH, SnapshotStream, fan_out, header
from components.stack_file import PROJECT, project_config
from kcp_host.contract import ClusterEnv, render_env
from kcp_host.files import PIPE_BYTES
from tests.conftest import ALL_STACKS
from tests.program import ROOT

LOCAL = ROOT / "stacks" / "Pulumi.local.yaml"


# -- which snapshot ---------------------------------------------------------------------------------
def backup(name: str, verified: bool | None, arrived: float | None = None, **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "verified": verified, "file_bytes": 10, "arrived": arrived, **extra}
    return {k: v for k, v in meta.items() if v is not None}


# Arrival (the store's own record) runs with the names here; the tests below pull them apart.
BACKUPS = [backup("c-20260101T000000Z", True, 1), backup("c-20260102T000000Z", True, 2),
           backup("c-20260103T000000Z", False, 3, verify_error="hashkv differs"), backup("c-20260104T000000Z", None, 4)]


def test_without_a_name_the_newest_verified_snapshot_is_restored() -> None:
    assert pick_backup(BACKUPS, None)["name"] == "c-20260102T000000Z", "newer but unverified snapshots are skipped"


def test_the_newest_is_the_newest_arrival_never_the_newest_name() -> None:
    """A name (and `taken_at`) is the uploader's word: one named for 9999 that arrived first is the oldest."""
    planted = backup("c-99991231T235959Z", True, 0.5, taken_at="9999-12-31T23:59:59Z")
    assert pick_backup([planted, *BACKUPS], None)["name"] == "c-20260102T000000Z"


def test_a_snapshot_whose_store_record_contradicts_its_metadata_is_skipped_and_refused_by_name() -> None:
    tampered = backup("c-20260105T000000Z", True, 5, refused="its metadata differs from what the backup host "
                      "recorded on its arrival")
    assert pick_backup([*BACKUPS, tampered], None)["name"] == "c-20260102T000000Z"
    with pytest.raises(RestoreError, match=r"c-20260105T000000Z: its metadata differs .*; refusing it"):
        pick_backup([*BACKUPS, tampered], "c-20260105T000000Z")


def test_without_a_record_of_its_arrival_a_snapshot_is_restored_only_by_name() -> None:
    unrecorded = backup("c-20260105T000000Z", True)
    assert pick_backup([unrecorded], "c-20260105T000000Z") is unrecorded
    with pytest.raises(RestoreError, match=r"no verified snapshot found with a record of its arrival \(name one"):
        pick_backup([unrecorded], None)


def test_a_snapshot_that_failed_verification_is_refused_even_by_name() -> None:
    with pytest.raises(RestoreError, match=r"c-20260103T000000Z failed verification \(hashkv differs\); refusing"):
        pick_backup(BACKUPS, "c-20260103T000000Z")


def test_a_named_snapshot_is_restored_even_when_it_is_not_the_newest() -> None:
    assert pick_backup(BACKUPS, "c-20260101T000000Z")["name"] == "c-20260101T000000Z"


@pytest.mark.parametrize(("backups", "wanted", "message"), [
    (BACKUPS, "c-20990101T000000Z", "no snapshot named c-20990101T000000Z"),
    ([backup("c-1", False, 1), backup("c-2", None, 2)], None, "no verified snapshot found"),
    ([], None, "no verified snapshot found"),
])
def test_nothing_is_restored_without_a_matching_snapshot(backups: list[dict[str, Any]], wanted: str | None,
                                                         message: str) -> None:
    with pytest.raises(RestoreError, match=message):
        pick_backup(backups, wanted)


class LocalShell(Ssh):
    """The backup host's shell, here: the listing runs as it would there, on a folder the real receiver filled."""

    def run(self, address: str, command: str, stdin: Any = None, timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["sh", "-c", command], capture_output=True, timeout=timeout, check=False)


def receive(root: Path, request: str, payload: bytes) -> subprocess.CompletedProcess[bytes]:
    """The etcd hosts' side of the receiver (`kcp-host etcd-backup-receive` as the backup host runs it)."""
    return subprocess.run([sys.executable, "-m", "kcp_host", "etcd-backup-receive", "--root", str(root),
                           "--retain-recent", "6", "--retain-daily", "3"], input=payload, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SSH_ORIGINAL_COMMAND": request}, check=False)


def upload(root: Path, name: str, db: bytes | None = None) -> bytes:
    db = db if db is not None else os.urandom(64)
    meta = {"name": name, "sha256": hashlib.sha256(db).hexdigest(), "verified": True, "revision": 1}
    assert receive(root, f"put {name}.db", db).returncode == 0
    assert receive(root, f"put {name}.json", json.dumps(meta).encode()).returncode == 0
    return db


def test_the_backup_hosts_listing_picks_by_the_receivers_record_and_ignores_a_tampered_pair(tmp_path: Path) -> None:
    root = tmp_path / "local"
    older, newest = "local-20260101T000000Z", "local-20250101T000000Z"  # the newest arrival has the older name
    upload(root, older)
    upload(root, newest)
    folder = BackupFolder(LocalShell("root", None), "backup-host", str(root))
    assert folder.pick(None)["name"] == newest
    # Changed on the backup host after it arrived: another file and metadata to match it. The receipt disagrees.
    evil = os.urandom(64)
    (root / f"{newest}.db").write_bytes(evil)
    meta = json.loads((root / f"{newest}.json").read_text())
    (root / f"{newest}.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(evil).hexdigest()}))
    assert folder.pick(None)["name"] == older, "the tampered pair is passed over"
    with pytest.raises(RestoreError, match=rf"{newest}: its metadata differs from what the backup host recorded"):
        folder.pick(newest)
    # Metadata that names a pair other than its own file is not that pair's either.
    (root / f"{newest}.json").write_text(json.dumps({**meta, "name": older}))
    assert [b["name"] for b in folder.listing() if not b.get("refused")] == [older]


def test_a_pair_filed_before_receipts_existed_counts_from_its_arrival_on_the_backup_hosts_clock(tmp_path: Path) -> None:
    """Planted for 9999 before the receiver refused such stamps: its .json was written then, so it is old."""
    root = tmp_path / "local"
    upload(root, "local-20260101T000000Z")
    planted = "local-99991231T235959Z"
    db = os.urandom(64)
    (root / f"{planted}.db").write_bytes(db)
    (root / f"{planted}.json").write_text(json.dumps({"name": planted, "sha256": hashlib.sha256(db).hexdigest(),
                                                      "verified": True}))
    os.utime(root / f"{planted}.json", (time.time() - 86_400, time.time() - 86_400))
    folder = BackupFolder(LocalShell("root", None), "backup-host", str(root))
    assert folder.pick(None)["name"] == "local-20260101T000000Z"
    assert folder.pick(planted)["name"] == planted, "still there for an operator who names it"


# -- what the members are told ----------------------------------------------------------------
SNAPSHOT = os.urandom(CHUNK * 2 + 12345)


def meta_of(data: bytes, name: str = "local-20260101T000000Z", **changes: Any) -> dict[str, Any]:
    return {"name": name, "file_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **changes}


def framed(data: bytes, meta: dict[str, Any]) -> tuple[list[bytes], SnapshotStream]:
    stream = SnapshotStream(io.BytesIO(data), meta)
    return list(stream), stream


def test_the_recorded_bytes_pass_unchanged_in_bounded_chunks_and_end_with_ok() -> None:
    chunks, stream = framed(SNAPSHOT, meta_of(SNAPSHOT))
    assert header(meta_of(SNAPSHOT)) == f"snapshot local-20260101T000000Z {len(SNAPSHOT)}", "sent first, alone"
    assert b"".join(chunks[:-1]) == SNAPSHOT and chunks[-1] == b"ok\n"
    assert max(len(c) for c in chunks[:-1]) <= CHUNK, "the snapshot must never be held whole in memory"
    assert stream.refusal is None and stream.count == len(SNAPSHOT)


def test_a_truncated_file_is_refused_after_its_bytes() -> None:
    chunks, stream = framed(SNAPSHOT[:-1000], meta_of(SNAPSHOT))
    assert chunks[-1] == f"refused {stream.refusal}\n".encode()
    assert stream.refusal == (f"{len(SNAPSHOT) - 1000} bytes arrived, the file had {len(SNAPSHOT)} when listed "
                              "(truncated or replaced)")


def test_a_corrupt_file_of_the_right_size_is_refused_by_its_sha256() -> None:
    damaged = bytearray(SNAPSHOT)
    damaged[4096] ^= 0xFF
    chunks, stream = framed(bytes(damaged), meta_of(SNAPSHOT))
    assert stream.refusal is not None and stream.refusal.endswith(f"expected {meta_of(SNAPSHOT)['sha256']} (corrupt)")
    assert chunks[-1] == f"refused {stream.refusal}\n".encode()


# -- one slow or dead member ------------------------------------------------------------------
class Sink(io.RawIOBase):
    """A member's stdin: records what it got; may be slow, or break after some writes."""

    def __init__(self, delay: float = 0.0, breaks_after: int | None = None,
                 error: type[OSError] = BrokenPipeError) -> None:
        self.got = bytearray()
        self.writes = 0
        self.delay, self.breaks_after, self.error = delay, breaks_after, error
        self.gate = threading.Event()
        self.gate.set()

    def writable(self) -> bool:
        return True

    def write(self, chunk: Any) -> int:
        self.gate.wait()
        if self.breaks_after is not None and self.writes >= self.breaks_after:
            raise self.error("the member went away")
        time.sleep(self.delay)
        self.writes += 1
        self.got += chunk
        return len(chunk)


def fan_out_within(seconds: float, chunks: Iterator[bytes] | list[bytes], sinks: dict[str, Sink]) -> None:
    worker = threading.Thread(target=fan_out, args=(chunks, sinks), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "fan_out hung"


CHUNKS = [bytes([n]) * 1000 for n in range(40)]


@pytest.mark.parametrize("error", [BrokenPipeError, ConnectionResetError, OSError])
def test_a_member_that_stops_reading_is_dropped_and_the_others_get_every_byte(error: type[OSError]) -> None:
    sinks = {"h1": Sink(), "h2": Sink(breaks_after=3, error=error), "h3": Sink(delay=0.002)}
    fan_out_within(10, CHUNKS, sinks)
    assert sinks["h1"].got == sinks["h3"].got == b"".join(CHUNKS)
    assert sinks["h2"].got == b"".join(CHUNKS[:3])
    assert all(s.closed for s in sinks.values()), "every member's stdin is closed, so each sees the end"


def test_a_session_that_goes_on_after_the_snapshot_keeps_every_members_stdin_open() -> None:
    sinks = {"h1": Sink(), "h2": Sink(breaks_after=3)}
    worker = threading.Thread(target=fan_out, args=(CHUNKS, sinks, False), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and sinks["h1"].got == b"".join(CHUNKS) and not sinks["h1"].closed


def test_a_slow_member_holds_back_the_reader_by_the_queue_depth_only() -> None:
    """The reader stays at most QUEUE_DEPTH chunks ahead of the slowest member: memory stays bounded."""
    produced = 0

    def source() -> Iterator[bytes]:
        nonlocal produced
        for chunk in CHUNKS * 3:
            produced += 1
            yield chunk

    stuck, fast = Sink(), Sink()
    stuck.gate.clear()
    worker = threading.Thread(target=fan_out, args=(source(), {"stuck": stuck, "fast": fast}), daemon=True)
    worker.start()
    time.sleep(0.3)
    assert produced <= QUEUE_DEPTH + 2, f"read {produced} chunks ahead of a member that took none"
    stuck.gate.set()
    worker.join(10)
    assert not worker.is_alive() and stuck.got == fast.got == b"".join(CHUNKS * 3)


# -- the plan, from the one stack file reader -------------------------------------------------
def local_raw() -> dict[str, Any]:
    return copy.deepcopy(project_config(LOCAL))


def write_stack(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"config": {f"{PROJECT}:{k}": v for k, v in raw.items()}}))
    return path


@pytest.fixture(autouse=True)
def private_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh's socket folders (made when a command line is built) go under the test's own tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def plan_for(*flags: str) -> Plan:
    return build_plan(parser(None).parse_args(list(flags)))


def backup_host(plan: Plan) -> BackupFolder:
    assert isinstance(plan.source, BackupFolder)
    return plan.source


def test_backups_are_read_from_the_model_default_folder_as_the_ssh_user(tmp_path: Path) -> None:
    """backupHost.path and .user default in the model; the login for reading is the SSH user: the
    stack's backupHost.user (etcd-backup) only runs the receiver, which cannot list or read."""
    raw = local_raw()
    raw["baremetal"]["backupHost"] = {"address": "10.250.0.20"}
    plan = plan_for("--stack", str(write_stack(tmp_path / "Pulumi.local.yaml", raw)))
    source = backup_host(plan)
    assert (source.address, source.directory) == ("10.250.0.20", "/srv/etcd-backups/local")
    listing = source.ssh.command(source.address or "", "ls", source.user)
    assert "root@10.250.0.20" in listing and not any("etcd-backup@" in arg for arg in listing)
    assert [h.name for h in plan.hosts] == ["h1", "h2", "h3"], "spares are not restored"


def test_a_non_root_ssh_user_reads_backups_and_runs_member_steps_through_sudo(tmp_path: Path) -> None:
    raw = local_raw()
    raw["baremetal"]["user"] = "admin"
    plan = plan_for("--stack", str(write_stack(tmp_path / "Pulumi.local.yaml", raw)))
    source = backup_host(plan)
    assert source.ssh.command(source.address or "", "ls", source.user)[-3:] == ["admin@10.250.0.20", "--",
                                                                                "sudo -n sh -c ls"]
    step = agent_command([["restore", "--token", "t"]])
    assert step == "/usr/local/lib/kcp/kcp-host etcd-restore-member restore --token t"
    assert plan.ssh.command(plan.hosts[0].address, step)[-3:] == ["admin@10.250.0.11", "--",
                                                                  f"sudo -n sh -c '{step}'"]


def test_only_hosts_with_the_etcd_role_are_restored(tmp_path: Path) -> None:
    raw = local_raw()
    raw["etcd"]["placement"] = "dedicated"
    raw["baremetal"]["hosts"] = (
        [{"name": f"e{i}", "address": f"10.250.0.{10 + i}", "zone": z, "roles": ["etcd"]}
         for i, z in enumerate(["rack-a", "rack-b", "rack-c"], 1)]
        + [{"name": f"a{i}", "address": f"10.250.0.{20 + i}", "zone": z, "roles": ["apiserver", "loadbalancer"]}
           for i, z in enumerate(["rack-a", "rack-b", "rack-c"], 1)])
    raw["baremetal"]["backupHost"]["address"] = "10.250.0.40"
    plan = plan_for("--stack", str(write_stack(tmp_path / "Pulumi.local.yaml", raw)))
    assert [(h.name, h.address) for h in plan.hosts] == [("e1", "10.250.0.11"), ("e2", "10.250.0.12"),
                                                         ("e3", "10.250.0.13")]


def test_flags_win_over_the_stack() -> None:
    plan = plan_for("--stack", "local", "--hosts", "d1=10.9.0.1,10.9.0.2", "--ssh-user", "ops", "--ssh-key", "/k",
                    "--backup-host", "10.9.0.9", "--backup-path", "/b/x", "--backup-user", "reader")
    source = backup_host(plan)
    assert [(h.name, h.address) for h in plan.hosts] == [("d1", "10.9.0.1"), ("10.9.0.2", "10.9.0.2")]
    assert (plan.ssh.user, plan.ssh.key) == ("ops", "/k")
    assert (source.address, source.directory, source.user) == ("10.9.0.9", "/b/x", "reader")


def test_without_a_stack_the_model_defaults_still_apply() -> None:
    plan = plan_for("--hosts", "h1=10.9.0.1", "--backup-host", "10.9.0.9", "--cluster-name", "prod")
    assert plan.ssh.user == "root" and backup_host(plan).directory == "/srv/etcd-backups/prod"


def test_a_stack_with_a_secret_ssh_key_still_plans_without_reading_the_secret(tmp_path: Path) -> None:
    raw = local_raw()
    del raw["baremetal"]["sshPrivateKeyPath"]
    raw["baremetal"]["sshPrivateKey"] = {"secure": "v1:AAAA"}
    plan = plan_for("--stack", str(write_stack(tmp_path / "Pulumi.local.yaml", raw)))
    assert plan.ssh.key is None and len(plan.hosts) == 3


def test_a_stack_file_that_does_not_validate_stops_the_restore_with_the_validation_message(tmp_path: Path) -> None:
    raw = local_raw()
    raw["etcd"]["members"] = 2
    path = write_stack(tmp_path / "Pulumi.local.yaml", raw)
    with pytest.raises(RestoreError, match=rf"^{path}: config key 'etcd.members': value 2 is not allowed"):
        plan_for("--stack", str(path))
    with pytest.raises(RestoreError, match="No such file"):
        plan_for("--stack", str(tmp_path / "Pulumi.missing.yaml"))


# -- what the preview workflow reads ----------------------------------------------------------
def report_facts(stack: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "report"), stack, "--facts"],
                          capture_output=True, text=True, timeout=60, check=True)
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_the_preview_facts_are_what_the_workflow_read_before(stack: str) -> None:
    """The workflow's former inline reader: target, the AWS provider's region, the SSH key path."""
    config = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
    before = {"target": config[f"{PROJECT}:target"], "aws-region": config.get("aws:region", ""),
              "ssh-key-path": config.get(f"{PROJECT}:baremetal", {}).get("sshPrivateKeyPath", "")}
    assert report_facts(stack) == before


def test_the_preview_workflow_reads_its_facts_through_scripts_report() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "preview.yml").read_text())
    steps = {s.get("id"): s for s in workflow["jobs"]["preview"]["steps"]}
    assert steps["stack"]["run"].strip() == '.venv/bin/python scripts/report "$STACK" --facts >> "$GITHUB_OUTPUT"'


# -- both ends of the wire protocol -----------------------------------------------------------
FAKE_ETCDUTL = """#!/bin/sh
case "$*" in *--help*) echo "${FAKE_ETCDUTL_HELP:-}"; exit 0 ;; esac
printf '%s\\n' "$*" >"$(dirname "$0")/../restore-args"
cp "$3" "$(dirname "$0")/../restored-input"
while [ $# -gt 0 ]; do case $1 in --data-dir) mkdir -p "$2/member/snap" ;; esac; shift; done
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def member(tmp_path: Path) -> Path:
    """One etcd host's files for a restore session; its snapshot tool is a stand-in that records its arguments."""
    if shutil.which("etcdutl", path="/usr/local/bin"):
        pytest.skip(reason="/usr/local/bin/etcdutl would run instead of the stand-in (the agent puts "
                           "/usr/local/bin first); run on a machine without it")
    try:
        pwd.getpwnam("etcd")
        if os.geteuid() != 0:
            pytest.skip(reason="user etcd exists and prepare gives it the restored data: run as root")
    except KeyError:
        pass
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "etcdutl").write_text(FAKE_ETCDUTL)
    (tmp_path / "bin" / "etcdutl").chmod(0o755)
    url = f"https://127.0.0.1:{closed_port()}"
    env = ClusterEnv(cluster_name="t", member_name="h1", peer_url="https://127.0.0.1:2380", client_url=url,
                     members=("h1=https://127.0.0.1:2380",), client_endpoints=(url,), etcd_ca="/none",
                     etcd_cert="/none", etcd_key="/none", data_dir=str(tmp_path / "data"),
                     restore_dir=str(tmp_path / "stage"), restored_file=str(tmp_path / "restored"),
                     join_env=str(tmp_path / "join.env"))
    (tmp_path / "cluster.env").write_text(render_env(env, "unit test"))
    return tmp_path


class Session:
    """`kcp-host etcd-restore-member restore`, talked to as the operator talks to it (components/restore/)."""

    def __init__(self, root: Path, *args: str, tool_help: str = "", expect_quorum: bool = True) -> None:
        env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
               "KCP_CLUSTER_ENV": str(root / "cluster.env"), "FAKE_ETCDUTL_HELP": tool_help}
        argv = [sys.executable, "-m", "kcp_host", "etcd-restore-member", "restore", "--token", "restore-t1", *args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        if expect_quorum:
            assert self.answer() == "quorum none", "no endpoint answers, so no quorum is seen"

    def answer(self) -> str:
        assert self.proc.stdout
        return self.proc.stdout.readline().decode().strip()

    def say(self, *chunks: bytes) -> None:
        assert self.proc.stdin
        fan_out(chunks, {"h1": self.proc.stdin}, close=False)

    def end(self) -> subprocess.CompletedProcess[bytes]:
        """The operator's end of input; what the member printed and logged until it exited."""
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.stdin = None
        out, err = self.proc.communicate(timeout=60)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def prepared(root: Path, meta: dict[str, Any], data: bytes, *args: str, tool_help: str = "") -> tuple[Session, str]:
    """A session up to its answer to the snapshot: `prepared ...` or a refusal (then: the member ended)."""
    session = Session(root, *args, tool_help=tool_help)
    session.say(f"{header(meta)}\n".encode())
    assert session.answer() == "room", "a few KB fit anywhere"
    session.say(b"send\n", *SnapshotStream(io.BytesIO(data), meta))
    return session, session.answer()


def left_behind(root: Path) -> list[str]:
    """What a restore wrote, but for its lock file (empty, and what the next restore locks)."""
    return sorted(p.name for p in [*root.glob("stage/*"), *root.glob("data.restoring-*")] if p.name != "restore.lock")


def test_a_snapshot_the_operator_accepted_is_staged_and_restored_beside_the_live_data(member: Path) -> None:
    meta = meta_of(SNAPSHOT)
    session, answer = prepared(member, meta, SNAPSHOT)
    words = answer.split()
    assert words[:2] == ["prepared", str(len(SNAPSHOT))] and len(words) == 6, answer
    assert session.proc.stdin and fcntl.fcntl(session.proc.stdin, fcntl.F_GETPIPE_SZ) == PIPE_BYTES, \
        "the member widened the pipe the snapshot came through"
    assert 0 < int(words[4]) < 64 * 1024, "the member's peak memory (KiB) stays far below the file's size"
    assert (member / "restored-input").read_bytes() == SNAPSHOT, "etcdutl restored the bytes sent"
    assert not list((member / "stage").glob("*.db*")), "the staged copy is deleted once restored"
    args = (member / "restore-args").read_text()
    assert "--skip-hash-check" in args and "--initial-cluster-token restore-t1" in args and "--name h1" in args
    assert (member / "data.restoring-restore-t1").is_dir() and not (member / "data").exists(), "nothing live changed"
    done = session.end()
    assert done.returncode == 1 and b"the operator stopped the restore before switch" in done.stderr
    assert not (member / "data.restoring-restore-t1").exists(), "what it prepared goes when the operator stops"


def test_a_bumped_restore_moves_the_revision_and_marks_it_compacted(member: Path) -> None:
    session, answer = prepared(member, meta_of(SNAPSHOT), SNAPSHOT, "--bump-revision", "1000000000",
                               tool_help="      --bump-revision uint64   How much to increase the latest revision")
    assert answer.startswith("prepared"), answer
    assert "--bump-revision 1000000000 --mark-compacted" in (member / "restore-args").read_text()
    session.end()


def test_a_member_whose_tool_cannot_bump_refuses_before_anything_moves(member: Path) -> None:
    session = Session(member, "--bump-revision", "1000000000", expect_quorum=False)
    done = session.end()
    assert done.returncode == 1 and b"cannot move the restored revision" in done.stderr, done.stderr
    assert b"quorum" not in done.stdout, "it answered the operator before refusing"
    assert left_behind(member) == [] and not (member / "restore-args").exists(), "something moved"


@pytest.mark.parametrize(("data", "reason"), [
    (SNAPSHOT[:-1000], "the stream ended after"),  # the verdict line went into the byte count
    (SNAPSHOT[:1000] + bytes([SNAPSHOT[1000] ^ 0xFF]) + SNAPSHOT[1001:], "(corrupt)"),
])
def test_a_snapshot_the_operator_refused_leaves_nothing_behind(member: Path, data: bytes, reason: str) -> None:
    meta = meta_of(SNAPSHOT, name="bad")
    session = Session(member)
    session.say(f"{header(meta)}\n".encode())
    assert session.answer() == "room"
    session.say(b"send\n", *SnapshotStream(io.BytesIO(data), meta))
    done = session.end()  # a short stream leaves the member waiting for bytes the operator no longer sends
    assert done.stdout == b"" and done.returncode == 1, "no 'prepared' answer"
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("h1: REFUSED bad: ") and reason in last, last
    assert left_behind(member) == [], "a refused snapshot's partial copy must be deleted"


def test_a_stream_that_ends_early_is_refused_by_the_member_itself(member: Path) -> None:
    session = Session(member)
    session.say(f"snapshot early {len(SNAPSHOT)}\n".encode())
    assert session.answer() == "room"
    session.say(b"send\n", SNAPSHOT[:5000])
    done = session.end()
    assert done.returncode == 1
    assert done.stderr.decode().strip().endswith(f"h1: REFUSED early: the stream ended after 5000 of {len(SNAPSHOT)} "
                                                 "bytes")
    assert left_behind(member) == []


def test_a_member_without_room_for_the_snapshot_and_its_restored_data_refuses_before_a_byte_moves(
        member: Path) -> None:
    """Its filesystem (here the test machine's) holds the staged file and the restored data: a snapshot of 4 PB
    fits on neither. The refusal names the folder and the numbers; nothing is written."""
    session = Session(member)
    session.say(f"snapshot huge {4 << 50}\n".encode())
    done = session.end()
    assert done.stdout == b"" and done.returncode == 1, "no 'room' answer"
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"h1: no room for the restore: {member}") and "MiB free, the restore needs" in last, last
    assert "4294967296 MiB snapshot" in last and last.endswith("nothing changed"), last
    assert left_behind(member) == []


def test_an_abort_before_the_snapshot_changes_nothing(member: Path) -> None:
    session = Session(member)
    session.say(b"abort\n")
    done = session.end()
    assert done.returncode == 1 and b"stopped before sending a snapshot; nothing changed" in done.stderr
    assert left_behind(member) == []


def test_a_second_restore_of_the_same_member_is_refused_while_one_runs(member: Path) -> None:
    first = Session(member)
    env = {**os.environ, "PATH": f"{member / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "KCP_CLUSTER_ENV": str(member / "cluster.env")}
    second = subprocess.run([sys.executable, "-m", "kcp_host", "etcd-restore-member", "restore", "--token", "r2"],
                            input=b"", capture_output=True, env=env, timeout=60, check=False)
    assert second.returncode == 1 and b"another restore of this member holds" in second.stderr, second.stderr
    assert second.stdout.endswith(b"quorum none\n") and b"room" not in second.stdout
    first.say(b"abort\n")
    assert first.end().returncode == 1
