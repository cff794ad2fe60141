"""etcd-backup-verify: prove that a snapshot restores to the data it claims to hold.

Right size and checksum do not show that: a throwaway etcd restored from it must show the revision, key count and
hashkv recorded from the live cluster. Exit 0: verified; 1: not (--update records why); 2: usage or environment.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kcp_host.contract import BackupEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, command_env, last_line, size_timeout, snapshot_status, snapshot_tool
from kcp_host.files import flocked, read_json, sha256_of, update_json, utc_iso
from kcp_host.log import Abort, log

# The throwaway etcd listens on unix sockets in its scratch dir (0700, root's), relative to it (a socket path has at
# most 107 bytes): no TCP port to collide with, and no other user of the host can read the snapshot through it.
CLIENT_SOCKET, PEER_SOCKET = "unix://kcpverify:0", "unix://kcpverify-peer:0"


class _Plain(Etcdctl):
    """The throwaway etcd has no TLS (only root reaches its sockets), and etcdctl refuses empty certificate flags."""

    def argv(self, endpoints: Sequence[str], *args: str, dial: str = "2s", timeout: str = "5s") -> list[str]:
        return [a for a in super().argv(endpoints, *args, dial=dial, timeout=timeout)
                if a not in ("--cacert=", "--cert=", "--key=")]


def key_count(ctl: Etcdctl, endpoint: str, revision: int, timeout: str = "60s") -> int:
    """The number of keys at `revision`: etcd counts them in its in-memory index, without reading the values."""
    got = ctl.json([endpoint], "get", "", "--prefix", "--keys-only", "--limit=1", f"--rev={revision}",
                   dial="3s", timeout=timeout)
    return int(got.get("count", 0))  # etcdctl's JSON leaves out zeros


def hash_at(ctl: Etcdctl, endpoint: str, revision: int, timeout: str = "60s") -> dict[str, int]:
    """hashkv at `revision` and the compaction point it covers the revisions after (-1: never compacted). It reads
    the whole database: `timeout` grows with it."""
    hashed = ctl.json([endpoint], "endpoint", "hashkv", f"--rev={revision}", dial="3s", timeout=timeout)[0]["HashKV"]
    return {"hashkv": int(hashed.get("hash", 0)), "compact_revision": int(hashed.get("compact_revision", 0))}


def contents(ctl: Etcdctl, endpoint: str, revision: int, timeout: str = "60s") -> dict[str, int]:
    """What a restore of a snapshot taken at `revision` must reproduce: key count, hashkv and its compaction point."""
    return {"keys": key_count(ctl, endpoint, revision, timeout), **hash_at(ctl, endpoint, revision, timeout)}


class ThrowawayError(Exception):
    """The snapshot did not restore, or its throwaway etcd did not come up; the message says which."""


@contextlib.contextmanager
def throwaway_etcd(snapshot: Path, work: Path, lock: str, *flags: str) -> Iterator[tuple[Etcdctl, str]]:
    """A single-member etcd restored from `snapshot` into a scratch dir under `work`, healthy, and its
    (etcdctl, client URL). Whatever it starts or makes is gone when the block ends, also on SIGTERM: it becomes an
    exit, so clean-ups run. `lock` (a file in `work`) keeps a second one of the same kind from running at once."""
    with contextlib.ExitStack() as stack:
        try:  # the lock also makes the work dir
            stack.enter_context(flocked(work / lock, wait_seconds=600, what=lock.strip(".").removesuffix(".lock")))
        except Abort as busy:
            raise Abort(2, str(busy)) from None
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, lambda n, _: sys.exit(128 + n)))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="verify.", dir=work)))
        name, client, peer = scratch.name, CLIENT_SOCKET, PEER_SOCKET
        restore = subprocess.run([snapshot_tool(), "snapshot", "restore", str(snapshot), "--data-dir",
                                  str(scratch / "data"), "--name", name, "--initial-cluster", f"{name}={peer}",
                                  "--initial-advertise-peer-urls", peer, "--initial-cluster-token", name],
                                 capture_output=True, text=True, env=command_env(), timeout=600, check=False)
        if restore.returncode != 0:
            raise ThrowawayError(f"snapshot restore failed: {last_line(restore.stderr or restore.stdout)}")
        # Only PATH: no ETCD_* settings of a live member. Its data is thrown away, so it is killed, not stopped.
        etcd = stack.enter_context(subprocess.Popen(
            ["etcd", "--name", name, "--data-dir", str(scratch / "data"), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--listen-metrics-urls", "", *flags], env={"PATH": command_env()["PATH"]}, cwd=scratch,
            stdout=stack.enter_context((scratch / "etcd.log").open("wb")), stderr=subprocess.STDOUT))
        stack.callback(etcd.kill)
        # etcd reads the whole restored database as it starts: a large one needs longer than the 30 s floor.
        slow = size_timeout(snapshot.stat().st_size, floor_seconds=30)
        ctl, deadline = _Plain("etcdctl", "", "", "", cwd=str(scratch)), time.monotonic() + float(slow[:-1])
        # Healthy, and answering with our own member name: we talk to the etcd we started, not a stray one.
        while not (ctl.healthy([client]) and any(m.name == name for m in ctl.members([client]) or ())):
            if time.monotonic() >= deadline or etcd.poll() is not None:
                tail = last_line((scratch / "etcd.log").read_text(errors="replace"))[:200]
                raise ThrowawayError(f"throwaway etcd did not become healthy: {tail}")
            time.sleep(0.25)
        yield ctl, client


def check(snapshot: Path, recorded: dict[str, Any] | None, backup: BackupEnv) -> tuple[list[str], dict[str, int]]:
    """The differences between what `snapshot` holds, restored, and what was recorded; and what it holds."""
    def differences(*found: tuple[str, str, object]) -> list[str]:  # without metadata, restoring is all that counts
        return [f"{what}: recorded {recorded.get(key)}, found {value}" for what, key, value in found
                if recorded is not None and recorded.get(key) != value]

    if not snapshot.is_file() or snapshot.stat().st_size == 0:
        return ["snapshot file missing or empty"], {}
    if failures := differences(("sha256", "sha256", sha256_of(snapshot))):
        return failures, {}
    try:
        status = snapshot_status(str(snapshot))
    except EtcdError as error:
        return [f"snapshot status refused the file: {error}"], {}
    failures = differences(("snapshot revision", "revision", status.get("revision")),
                           ("snapshot total keys", "total_keys", status.get("totalKey")),
                           ("snapshot hash", "snapshot_hash", status.get("hash")))
    try:
        with throwaway_etcd(snapshot, Path(backup.work_dir), ".verify.lock") as (ctl, client):
            revision = int(ctl.json([client], "endpoint", "status")[0]["Status"]["header"]["revision"])
            found = {"revision": revision, **contents(ctl, client, revision, size_timeout(snapshot.stat().st_size))}
    except ThrowawayError as error:
        return [*failures, str(error)], {}
    except (EtcdError, LookupError) as error:
        return [*failures, f"cannot read the throwaway etcd: {error}"], {}
    return failures + differences(("revision", "revision", found["revision"]), ("key count", "keys", found["keys"]),
                                  ("hashkv", "hashkv", found["hashkv"])), found


def check_and_record(snapshot: Path, meta: Path | None, backup: BackupEnv, update: bool) -> bool:
    """Without `meta`, only that the snapshot restores is checked."""
    started = time.monotonic()
    recorded = None if meta is None else read_json(meta)
    if recorded == {}:
        raise Abort(2, f"metadata {meta} missing or unreadable")
    failures, found = check(snapshot, recorded, backup)
    log(f"FAILED: {snapshot}: {'; '.join(failures)}" if failures else
        f"OK: {snapshot} verified in {time.monotonic() - started:.2f}s (revision {found['revision']}, "
        f"keys {found['keys']}, hashkv {found['hashkv']})")
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
    return 0 if check_and_record(args.snapshot, args.metadata, load_env(BackupEnv), args.update) else 1
