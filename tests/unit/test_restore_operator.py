"""Policies of the operator's side of a restore (components/restore/) and of the one stack file reader.

Which snapshot a restore picks, what the members are told about the bytes they received, how one
slow or dead member affects the others, where the plan's hosts, users and folders come from,
and the facts the preview workflow reads. The last tests run the real host side
(`kcp-host etcd-restore-member prepare`) against the operator's stream, so both ends of the
wire protocol are checked together.
"""

from __future__ import annotations

import copy
import hashlib
import io
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
from components.restore.stream import CHUNK, QUEUE_DEPTH, SnapshotStream, fan_out
from components.stack_file import PROJECT, project_config
from kcp_host.contract import ClusterEnv, render_env
from tests.conftest import ALL_STACKS
from tests.program import ROOT

LOCAL = ROOT / "stacks" / "Pulumi.local.yaml"


# -- which snapshot ---------------------------------------------------------------------------
def backup(name: str, verified: bool | None, **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "verified": verified, "file_bytes": 10, **extra}
    return meta if verified is not None else {k: v for k, v in meta.items() if k != "verified"}


BACKUPS = [backup("c-20260101T000000Z", True), backup("c-20260102T000000Z", True),
           backup("c-20260103T000000Z", False, verify_error="hashkv differs"), backup("c-20260104T000000Z", None)]


def test_without_a_name_the_newest_verified_snapshot_is_restored() -> None:
    assert pick_backup(BACKUPS, None)["name"] == "c-20260102T000000Z", "newer but unverified snapshots are skipped"


def test_a_snapshot_that_failed_verification_is_refused_even_by_name() -> None:
    with pytest.raises(RestoreError, match=r"c-20260103T000000Z failed verification \(hashkv differs\); refusing"):
        pick_backup(BACKUPS, "c-20260103T000000Z")


def test_a_named_snapshot_is_restored_even_when_it_is_not_the_newest() -> None:
    assert pick_backup(BACKUPS, "c-20260101T000000Z")["name"] == "c-20260101T000000Z"


@pytest.mark.parametrize(("backups", "wanted", "message"), [
    (BACKUPS, "c-20990101T000000Z", "no snapshot named c-20990101T000000Z"),
    ([backup("c-1", False), backup("c-2", None)], None, "no verified snapshot found"),
    ([], None, "no verified snapshot found"),
])
def test_nothing_is_restored_without_a_matching_snapshot(backups: list[dict[str, Any]], wanted: str | None,
                                                         message: str) -> None:
    with pytest.raises(RestoreError, match=message):
        pick_backup(backups, wanted)


# -- what the members are told ----------------------------------------------------------------
SNAPSHOT = os.urandom(CHUNK * 2 + 12345)


def meta_of(data: bytes, name: str = "local-20260101T000000Z", **changes: Any) -> dict[str, Any]:
    return {"name": name, "file_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **changes}


def framed(data: bytes, meta: dict[str, Any]) -> tuple[list[bytes], SnapshotStream]:
    stream = SnapshotStream(io.BytesIO(data), meta)
    return list(stream), stream


def test_the_recorded_bytes_pass_unchanged_in_bounded_chunks_and_end_with_ok() -> None:
    chunks, stream = framed(SNAPSHOT, meta_of(SNAPSHOT))
    assert chunks[0] == f"snapshot local-20260101T000000Z {len(SNAPSHOT)}\n".encode()
    assert b"".join(chunks[1:-1]) == SNAPSHOT and chunks[-1] == b"ok\n"
    assert max(len(c) for c in chunks[1:-1]) <= CHUNK, "the snapshot must never be held whole in memory"
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
    step = agent_command([["switch", "--token", "t"]])
    assert step == "/usr/local/lib/kcp/kcp-host etcd-restore-member switch --token t"
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
printf '%s\\n' "$*" >"$(dirname "$0")/../restore-args"
while [ $# -gt 0 ]; do case $1 in --data-dir) mkdir -p "$2/member/snap" ;; esac; shift; done
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def member(tmp_path: Path) -> Path:
    """One etcd host's files for `prepare`; its snapshot tool is a stand-in that records its arguments."""
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


def prepare(root: Path, chunks: list[bytes]) -> subprocess.CompletedProcess[bytes]:
    """`kcp-host etcd-restore-member prepare` fed as the operator feeds it."""
    env = {**os.environ, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "KCP_CLUSTER_ENV": str(root / "cluster.env")}
    argv = [sys.executable, "-m", "kcp_host", "etcd-restore-member", "prepare", "--token", "restore-t1"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout and proc.stdin
    assert proc.stdout.readline() == b"quorum none\n", "no endpoint answers, so no quorum is seen"
    fan_out(chunks, {"h1": proc.stdin})
    proc.stdin = None
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def left_behind(root: Path) -> list[str]:
    return sorted(p.name for p in [*root.glob("stage/*"), *root.glob("data.restoring-*")])


def test_a_snapshot_the_operator_accepted_is_staged_and_restored_beside_the_live_data(member: Path) -> None:
    meta = meta_of(SNAPSHOT)
    done = prepare(member, list(SnapshotStream(io.BytesIO(SNAPSHOT), meta)))
    assert done.returncode == 0, done.stderr.decode()
    words = done.stdout.decode().split()
    assert words[:2] == ["prepared", str(len(SNAPSHOT))] and len(words) == 4
    assert (member / "stage" / f"{meta['name']}.db").read_bytes() == SNAPSHOT
    args = (member / "restore-args").read_text()
    assert "--skip-hash-check" in args and "--initial-cluster-token restore-t1" in args and "--name h1" in args
    assert (member / "data.restoring-restore-t1").is_dir() and not (member / "data").exists(), "nothing live changed"


@pytest.mark.parametrize(("data", "reason"), [
    (SNAPSHOT[:-1000], "the stream ended after"),  # the verdict line went into the byte count
    (SNAPSHOT[:1000] + bytes([SNAPSHOT[1000] ^ 0xFF]) + SNAPSHOT[1001:], "(corrupt)"),
])
def test_a_snapshot_the_operator_refused_leaves_nothing_behind(member: Path, data: bytes, reason: str) -> None:
    meta = meta_of(SNAPSHOT, name="bad")
    done = prepare(member, list(SnapshotStream(io.BytesIO(data), meta)))
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("h1: REFUSED bad: ") and reason in last, last
    assert left_behind(member) == [], "a refused snapshot's partial copy must be deleted"


def test_a_stream_that_ends_early_is_refused_by_the_member_itself(member: Path) -> None:
    done = prepare(member, [f"snapshot early {len(SNAPSHOT)}\n".encode(), SNAPSHOT[:5000]])
    assert done.returncode == 1
    assert done.stderr.decode().strip().endswith(f"h1: REFUSED early: the stream ended after 5000 of {len(SNAPSHOT)} "
                                                 "bytes")
    assert left_behind(member) == []


def test_an_abort_before_the_snapshot_changes_nothing(member: Path) -> None:
    done = prepare(member, [b"abort\n"])
    assert done.returncode == 1 and b"stopped before sending a snapshot; nothing changed" in done.stderr
    assert left_behind(member) == []
