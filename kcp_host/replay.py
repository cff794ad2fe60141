"""etcd-delta-replay: a snapshot plus the delta log's revisions, replayed into a throwaway etcd, checked against
what the archiver recorded, and saved as one point-in-time snapshot for scripts/etcd-restore to restore.

One transaction per archived revision, in order, so every replayed revision has its original number, keys keep
their create revisions and versions, and the hashkv the archiver recorded can be compared (docs/backups.md).

stdin: SNAPSHOT_BYTES bytes of the snapshot, then CHUNK_BYTES bytes of chunks (kcp_host/deltalog.py) in chain
order. stdout: the point-in-time snapshot. stderr: progress, and `result {JSON}` as its last line.
Exit 0; 1: the chain, the replay or its check failed (stdout then holds nothing to restore); 2: usage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kcp_host import deltalog, verify
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, size_timeout, snapshot_status, snapshot_tool
from kcp_host.files import copy_stream
from kcp_host.log import Abort, log

LEASE_TTL_UNKNOWN = 3600  # a lease whose grant the archiver could not read: Kubernetes' event TTL, 1 h
QUOTA_BYTES = 8 << 30  # the members' backend quota (render/etcd.py): a database that fits there fits here


class Gateway(http.client.HTTPConnection):
    """etcd's JSON gateway on the throwaway's unix socket: transactions with binary keys and values, and leases
    granted with a given ID, which etcdctl cannot do."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Through the socket's folder, opened: a socket path has at most 107 bytes, the folder's path may not."""
        folder = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(f"/proc/self/fd/{folder}/{self.socket_path.name}")
        finally:
            os.close(folder)

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer: dict[str, Any] = json.loads(self.getresponse().read() or b"{}")
        return answer


class Replay:
    """Applies revisions in order; each must get the number it had."""

    def __init__(self, gateway: Gateway, revision: int) -> None:
        self.gateway, self.revision, self.count = gateway, revision, 0
        self.leases: set[int] = set()

    def grant(self, lease: int, ttl: int) -> None:
        """The same lease ID, so the replayed keys carry it; one restored from the snapshot exists already."""
        if lease in self.leases:
            return
        answer = self.gateway.call("/v3/lease/grant", {"ID": str(lease), "TTL": str(ttl)})
        if "message" in answer and "lease already exists" not in str(answer["message"]):
            raise Abort(1, f"granting lease {lease:x} failed: {answer['message']}")
        self.leases.add(lease)

    def apply(self, chunk: deltalog.Chunk, revision: deltalog.Revision) -> None:
        if revision.rev != self.revision + 1:
            raise Abort(1, f"the chain breaks: revision {revision.rev} follows {self.revision} (chunk {chunk.name})")
        ops = []
        for op in revision.ops:
            if op[0] == "put":
                lease = int(op[3])
                if lease:  # 0: the archiver found it revoked already
                    self.grant(lease, chunk.leases.get(lease) or LEASE_TTL_UNKNOWN)
                ops.append({"requestPut": {"key": op[1], "value": op[2], **({"lease": str(lease)} if lease else {})}})
            else:
                ops.append({"requestDeleteRange": {"key": op[1]}})
        answer = self.gateway.call("/v3/kv/txn", {"success": ops})
        got = int(answer.get("header", {}).get("revision", 0))
        if got != revision.rev:
            raise Abort(1, f"revision {revision.rev} replayed as {got}: {str(answer)[:200]}")
        self.revision, self.count = got, self.count + 1


def chunks_of(stream: IO[bytes], size: int) -> Iterator[deltalog.Chunk]:
    """The chunks in `size` bytes of `stream`, one at a time: a header line starts the next one."""
    pending: list[bytes] = []
    left = size
    while left > 0:
        line = stream.readline(min(left, deltalog.MAX_CHUNK_BYTES))
        if not line:
            raise Abort(1, f"the chunks ended {left} bytes early")
        left -= len(line)
        if not line.startswith(b'{"rev"') and pending:  # any line but a revision's starts the next chunk
            yield decode(pending)
            pending = []
        pending.append(line)
    if pending:
        yield decode(pending)


def decode(lines: list[bytes]) -> deltalog.Chunk:
    try:
        return deltalog.decode(b"".join(lines))
    except deltalog.DeltaError as error:
        raise Abort(1, f"a chunk is unreadable: {error}") from None


def receive(stream: IO[bytes], size: int, into: Path) -> None:
    """Exactly `size` bytes into `into`, never the whole file in memory."""
    with into.open("wb") as out:
        left = size - copy_stream(stream, out, size)
    if left:
        raise Abort(1, f"the snapshot ended {left} bytes early")


def check(ctl: Etcdctl, client: str, recorded: dict[str, int]) -> None:
    """The archiver's record at a revision: its hashkv covers the revisions after its compaction point, so the
    throwaway is compacted there first (a snapshot is never compacted further than the live cluster later was)."""
    compact, revision = int(recorded.get("compact_revision", 0)), int(recorded["revision"])
    if compact > 0:
        ctl.compact([client], compact, physical=True, timeout="600s")
    found = {k: v for k, v in verify.contents(ctl, client, revision, "600s").items() if k in ("keys", "hashkv")}
    wanted = {"keys": recorded["keys"], "hashkv": recorded["hashkv"]}
    if found != wanted:
        raise Abort(1, f"the replay differs from the live cluster at revision {revision}: recorded {wanted}, "
                       f"replayed {found}")
    log(f"revision {revision} checked: {found['keys']} keys, hashkv {found['hashkv']} as the archiver recorded")


def replay(snapshot_bytes: int, chunk_bytes: int, until: int | None, out: IO[bytes]) -> dict[str, Any]:
    started = time.monotonic()
    work = Path(load_env(ClusterEnv).restore_dir)
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="replay.", dir=work) as scratch:
        base = Path(scratch) / "base.db"
        receive(sys.stdin.buffer, snapshot_bytes, base)
        revision = int(snapshot_status(str(base))["revision"])
        fast = ("--unsafe-no-fsync",) if snapshot_tool() == "etcdutl" else ()  # 3.5 and later; thrown away anyway
        try:
            with verify.throwaway_etcd(base, work, ".replay.lock", f"--quota-backend-bytes={QUOTA_BYTES}",
                                       *fast) as (ctl, client):
                assert ctl.cwd
                gateway = Gateway(Path(ctl.cwd) / verify.CLIENT_SOCKET.removeprefix("unix://"))
                state, last_check = Replay(gateway, revision), None
                for chunk in chunks_of(sys.stdin.buffer, chunk_bytes):
                    for row in deltalog.revisions([chunk], after=state.revision, until=until):
                        state.apply(chunk, row)
                    if chunk.check and chunk.check["revision"] <= state.revision:
                        last_check = chunk.check
                if until is not None and state.revision < until:
                    raise Abort(1, f"revision {until} is not in the chunks: they end at {state.revision}")
                log(f"replayed {state.count} revisions onto the snapshot's {revision}, now at {state.revision}")
                if last_check:
                    check(ctl, client, last_check)
                target = Path(scratch) / "replayed.db"
                ctl.run([client], "snapshot", "save", str(target), timeout=size_timeout(base.stat().st_size))
                result = {"revision": state.revision, "replayed": state.count,
                          "checked_revision": last_check["revision"] if last_check else None,
                          **verify.contents(ctl, client, state.revision, "600s")}
        except verify.ThrowawayError as error:
            raise Abort(1, str(error)) from None
        except EtcdError as error:
            raise Abort(1, f"the throwaway etcd failed: {error}") from None
        with target.open("rb") as saved:
            shutil.copyfileobj(saved, out, 1 << 20)
        out.flush()
    return {**result, "seconds": round(time.monotonic() - started, 2)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-delta-replay", description=__doc__.splitlines()[0])
    parser.add_argument("snapshot_bytes", type=int, metavar="SNAPSHOT_BYTES")
    parser.add_argument("chunk_bytes", type=int, metavar="CHUNK_BYTES")
    parser.add_argument("--until", type=int, metavar="REVISION", help="stop after this revision")
    args = parser.parse_args(argv)
    if args.snapshot_bytes <= 0 or args.chunk_bytes < 0:
        parser.error("SNAPSHOT_BYTES must be positive and CHUNK_BYTES not negative")
    os.umask(0o077)  # the files hold every secret of the cluster
    result = replay(args.snapshot_bytes, args.chunk_bytes, args.until, sys.stdout.buffer)
    print(f"result {json.dumps(result, sort_keys=True)}", file=sys.stderr, flush=True)
    return 0
