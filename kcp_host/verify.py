"""etcd-backup-verify: prove that a snapshot restores to the data it claims to hold.

It restores the snapshot into a scratch dir, starts a throwaway single-member etcd on loopback
ports, and compares revision, key count and hashkv with the values recorded from the live
cluster when the snapshot was taken. A snapshot that only "looks fine" (right size, right
checksum) but would not come back as the same data is caught here, before anyone needs it.
etcd-backup calls `check_and_record` in-process; the subcommand is for standalone use.
Exit 0: verified. 1: verification failed (with --update the metadata says so). 2: usage or
environment error (metadata missing, a port in use, another verification running).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from kcp_host.contract import BackupEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, command_env, last_line, snapshot_status, snapshot_tool
from kcp_host.files import flocked, read_json, sha256_of, update_json, utc_iso
from kcp_host.log import Abort, log

READY_SECONDS = 30


class _Plain(Etcdctl):
    """etcdctl for the throwaway etcd, which serves plain HTTP on loopback: no certificate flags."""

    def argv(self, endpoints: Sequence[str], *args: str, dial: str = "2s", timeout: str = "5s") -> list[str]:
        return [a for a in super().argv(endpoints, *args, dial=dial, timeout=timeout)
                if a not in ("--cacert=", "--cert=", "--key=")]


def contents(ctl: Etcdctl, endpoint: str, revision: int) -> dict[str, int]:
    """Key count and hashkv of a member's data at `revision`: what a restore of a snapshot taken there
    must reproduce. Count and hash are left out of etcdctl's JSON when they are 0."""
    got = ctl.json([endpoint], "get", "", "--prefix", "--keys-only", "--limit=1", f"--rev={revision}",
                   dial="3s", timeout="60s")
    hashed = ctl.json([endpoint], "endpoint", "hashkv", f"--rev={revision}", dial="3s", timeout="60s")
    return {"keys": int(got.get("count", 0)), "hashkv": int(hashed[0]["HashKV"].get("hash", 0))}


def differences(recorded: dict[str, Any] | None, found: Iterable[tuple[str, str, object]]) -> list[str]:
    """`what: recorded X, found Y` for each (what, metadata key, value found) that disagrees."""
    if recorded is None:
        return []
    return [f"{what}: recorded {recorded.get(key)}, found {value}" for what, key, value in found
            if recorded.get(key) != value]


def check(snapshot: Path, recorded: dict[str, Any] | None, backup: BackupEnv) -> tuple[list[str], dict[str, int]]:
    """(failures, what the restored snapshot holds); no failure means verified. Without `recorded` it
    only checks that the snapshot restores. Abort(2) when no throwaway etcd can run here."""
    if not snapshot.is_file() or snapshot.stat().st_size == 0:
        return ["snapshot file missing or empty"], {}
    failures = differences(recorded, [("sha256", "sha256", sha256_of(snapshot))])
    if failures:
        return failures, {}
    try:
        status = snapshot_status(str(snapshot))
    except EtcdError as error:
        return [f"snapshot status refused the file: {error}"], {}
    failures = differences(recorded, [("snapshot revision", "revision", status.get("revision")),
                                      ("snapshot total keys", "total_keys", status.get("totalKey")),
                                      ("snapshot hash", "snapshot_hash", status.get("hash"))])
    problem, found = restore_and_read(snapshot, backup)
    if problem:
        return [*failures, problem], found
    return failures + differences(recorded, [("revision", "revision", found["revision"]),
                                             ("key count", "keys", found["keys"]),
                                             ("hashkv", "hashkv", found["hashkv"])]), found


def restore_and_read(snapshot: Path, backup: BackupEnv) -> tuple[str, dict[str, int]]:
    """Restore into a scratch dir, run a throwaway etcd on it and read what it holds: ("", found) or
    (the problem, {}). Abort(2) when its ports are taken."""
    for port in (backup.verify_client_port, backup.verify_peer_port):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise Abort(2, f"port 127.0.0.1:{port} is in use; a throwaway etcd cannot start there")
    name = f"verify-{os.getpid()}"
    client = f"http://127.0.0.1:{backup.verify_client_port}"
    peer = f"http://127.0.0.1:{backup.verify_peer_port}"
    with scratch_dir(Path(backup.work_dir)) as scratch:
        restore = subprocess.run([snapshot_tool(), "snapshot", "restore", str(snapshot), "--data-dir",
                                  str(scratch / "data"), "--name", name, "--initial-cluster", f"{name}={peer}",
                                  "--initial-advertise-peer-urls", peer, "--initial-cluster-token", name],
                                 capture_output=True, text=True, env=command_env(), timeout=600, check=False)
        if restore.returncode != 0:
            return f"snapshot restore failed: {last_line(restore.stderr or restore.stdout)}", {}
        with throwaway_etcd(scratch, name, client, peer) as etcd:
            ctl = _Plain("etcdctl", "", "", "")
            if not wait_ready(ctl, etcd, client, name):
                log_tail = last_line((scratch / "etcd.log").read_text(errors="replace"))[:200]
                return f"throwaway etcd did not become healthy: {log_tail}", {}
            try:
                revision = int(ctl.json([client], "endpoint", "status")[0]["Status"]["header"]["revision"])
                return "", {"revision": revision, **contents(ctl, client, revision)}
            except (EtcdError, LookupError) as error:
                return f"cannot read the throwaway etcd: {error}", {}


@contextlib.contextmanager
def scratch_dir(work: Path) -> Iterator[Path]:
    """A scratch dir under the work dir, used under the verification lock and always removed, also when
    systemd stops the run: SIGTERM becomes an exit, which runs every clean-up on the way out."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(flocked(work / ".verify.lock", wait_seconds=600, what="verification"))
        except Abort as busy:
            raise Abort(2, str(busy)) from None
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, stop))
        yield Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="verify.", dir=work)))


@contextlib.contextmanager
def throwaway_etcd(scratch: Path, name: str, client: str, peer: str) -> Iterator[subprocess.Popen[bytes]]:
    """etcd on the restored data, stopped when the block ends."""
    with (scratch / "etcd.log").open("wb") as out:
        # Only PATH: the throwaway must not pick up ETCD_* settings of a live member from the caller.
        etcd = subprocess.Popen(["etcd", "--name", name, "--data-dir", str(scratch / "data"),
                                 "--listen-client-urls", client, "--advertise-client-urls", client,
                                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                 "--listen-metrics-urls", ""], env={"PATH": command_env()["PATH"]},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield etcd
    finally:
        etcd.terminate()
        try:
            etcd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            etcd.kill()
            etcd.wait()


def wait_ready(ctl: Etcdctl, etcd: subprocess.Popen[bytes], client: str, name: str) -> bool:
    """Healthy, and answering with our own member name: we talk to the etcd we started, not a stray one."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and etcd.poll() is None:
        with contextlib.suppress(EtcdError):
            members = ctl.json([client], "member", "list", dial="1s", timeout="2s").get("members") or []
            if any(m.get("name") == name for m in members) and ctl.healthy([client]):
                return True
        time.sleep(0.25)
    return False


def check_and_record(snapshot: Path, meta: Path | None, backup: BackupEnv, update: bool) -> bool:
    """Verify against the metadata file (if any), log the outcome and, with `update`, write it into the
    metadata: verified, verified_at, verify_seconds, verify_error."""
    started = time.monotonic()
    recorded = None
    if meta is not None:
        recorded = read_json(meta)
        if not recorded:
            raise Abort(2, f"metadata {meta} missing or unreadable")
    failures, found = check(snapshot, recorded, backup)
    if failures:
        log(f"FAILED: {snapshot}: {'; '.join(failures)}")
    else:
        log(f"OK: {snapshot} verified in {time.monotonic() - started:.2f}s (revision {found.get('revision')}, "
            f"keys {found.get('keys')}, hashkv {found.get('hashkv')})")
    if update and meta is not None:
        record(meta, failures, time.monotonic() - started)
    return not failures


def record(meta: Path, failures: list[str], seconds: float) -> None:
    update_json(meta, verified=not failures, verified_at=utc_iso(), verify_seconds=round(seconds, 2),
                verify_error="; ".join(failures))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-backup-verify", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the result (verified, verified_at, "
                        "verify_seconds, verify_error) into METADATA_JSON")
    parser.add_argument("snapshot", type=Path, metavar="SNAPSHOT_FILE")
    parser.add_argument("metadata", type=Path, nargs="?", metavar="METADATA_JSON",
                        help="written by etcd-backup; without it, only check that the snapshot restores")
    args = parser.parse_args(argv)
    if args.update and args.metadata is None:
        parser.error("--update needs METADATA_JSON")
    backup = load_env(BackupEnv)
    return 0 if check_and_record(args.snapshot, args.metadata, backup, args.update) else 1
