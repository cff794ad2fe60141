"""etcd through `etcdctl -w json`: typed members, health, status, and the snapshot tool.

Every call passes certificates as paths (never content) and names its endpoints, so the
agent never depends on ETCDCTL_* variables of whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kcp_host.contract import ClusterEnv

_VERSION = re.compile(r"^etcdctl version: (\d+)\.(\d+)", re.MULTILINE)


class EtcdError(Exception):
    """etcdctl failed or answered something unreadable; the message is its last line."""


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool

    @property
    def hex_id(self) -> str:
        return f"{self.id:x}"

    @property
    def started(self) -> bool:
        """A member that never ran has published no client URLs."""
        return bool(self.client_urls)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Member:
        return cls(int(raw["ID"]), raw.get("name", ""), tuple(raw.get("peerURLs") or ()),
                   tuple(raw.get("clientURLs") or ()), bool(raw.get("isLearner")))


def command_env() -> dict[str, str]:
    """The caller's environment without ETCDCTL_* (etcdctl refuses ones that shadow our flags)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    env["PATH"] = "/usr/local/bin:" + env.get("PATH", "/usr/bin:/bin")
    return env


@dataclass(frozen=True)
class Etcdctl:
    program: str
    ca: str
    cert: str
    key: str
    cwd: str | None = None  # where relative unix:// endpoints resolve (the verification etcd's scratch dir)

    @classmethod
    def of(cls, env: ClusterEnv, cert: str | None = None, key: str | None = None) -> Etcdctl:
        """With this member's own certificate, or another one (the backup job's)."""
        return cls(env.etcdctl, env.etcd_ca, cert or env.etcd_cert, key or env.etcd_key)

    def argv(self, endpoints: Sequence[str], *args: str, dial: str = "2s", timeout: str = "5s") -> list[str]:
        return [self.program, f"--endpoints={','.join(endpoints)}", f"--cacert={self.ca}", f"--cert={self.cert}",
                f"--key={self.key}", f"--dial-timeout={dial}", f"--command-timeout={timeout}", *args]

    def run(self, endpoints: Sequence[str], *args: str, dial: str = "2s", timeout: str = "5s",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        if not endpoints:
            raise EtcdError("no endpoints to ask")
        proc = subprocess.run(self.argv(endpoints, *args, dial=dial, timeout=timeout), capture_output=True,
                              text=True, env=command_env(), cwd=self.cwd,
                              timeout=max(300, float(timeout.removesuffix("s")) + 60), check=False)
        if check and proc.returncode != 0:
            raise EtcdError(last_line(proc.stderr or proc.stdout) or f"etcdctl {args[0]} exit {proc.returncode}")
        return proc

    def json(self, endpoints: Sequence[str], *args: str, dial: str = "2s", timeout: str = "5s") -> Any:
        proc = self.run(endpoints, *args, "-w", "json", dial=dial, timeout=timeout)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise EtcdError(f"etcdctl {args[0]} printed no JSON: {proc.stdout[:200]!r}") from None

    def members(self, endpoints: Sequence[str]) -> list[Member] | None:
        """The member list, or None when no endpoint answered. etcd 3.4 serves it from a member's
        local view (it answers without a quorum too); 3.5 makes it linearizable (it needs a quorum)."""
        try:
            listed = self.json(endpoints, "member", "list")
        except EtcdError:
            return None
        members = [Member.of(m) for m in listed.get("members") or []]
        return members or None

    def healthy(self, endpoints: Sequence[str], dial: str = "1s", timeout: str = "2s") -> bool:
        """A linearizable read through every endpoint given answered (it needs a quorum)."""
        return bool(endpoints) and self.run(endpoints, "endpoint", "health", dial=dial, timeout=timeout,
                                            check=False).returncode == 0

    def health(self, endpoints: Sequence[str], dial: str = "1s", timeout: str = "2s") -> dict[str, bool]:
        """Each endpoint's own answer to a linearizable read (False where it did not answer)."""
        proc = self.run(endpoints, "endpoint", "health", "-w", "json", dial=dial, timeout=timeout, check=False)
        answers = {endpoint: False for endpoint in endpoints}
        with contextlib.suppress(ValueError, KeyError, TypeError):
            answers.update({e["endpoint"]: bool(e.get("health")) for e in json.loads(proc.stdout or "[]")})
        return answers

    def status(self, endpoint: str, dial: str = "1s", timeout: str = "2s") -> dict[str, Any] | None:
        """`endpoint status` of one member: {"header": {...}, "leader", "dbSize", "version", ...}."""
        try:
            entries = self.json([endpoint], "endpoint", "status", dial=dial, timeout=timeout)
        except EtcdError:
            return None
        return entries[0]["Status"] if entries else None

    def compact(self, endpoints: Sequence[str], revision: int, physical: bool = False,
                timeout: str = "120s") -> None:
        """Compact to `revision`; already compacted there or beyond ("required revision has been compacted") is done.
        EtcdError for any other failure."""
        try:
            self.run(endpoints, "compact", str(revision), *(["--physical"] if physical else []), timeout=timeout)
        except EtcdError as error:
            if "compacted" not in str(error):
                raise

    def version(self) -> tuple[int, int] | None:
        proc = subprocess.run([self.program, "version"], capture_output=True, text=True, env=command_env(),
                              timeout=30, check=False)
        found = _VERSION.search(proc.stdout)
        return (int(found[1]), int(found[2])) if found else None


def last_line(text: str) -> str:
    """The last line that is not one of etcd's JSON-formatted log lines."""
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith('{"level"')]
    return lines[-1].strip() if lines else ""


def snapshot_tool() -> str:
    """`snapshot status|restore` moved from etcdctl to etcdutl in 3.5 and left etcdctl in 3.6."""
    return "etcdutl" if shutil.which("etcdutl", path=command_env()["PATH"]) else "etcdctl"


def size_timeout(size_bytes: int, floor_seconds: int = 60) -> str:
    """An etcdctl command timeout for work that reads a whole database (snapshot save, hashkv, a restore's start):
    at 20 MiB/s, never under `floor_seconds`. A fixed 60 s failed the backup of a 4 GiB database."""
    return f"{max(floor_seconds, size_bytes // (20 << 20))}s"


def snapshot_status(path: str) -> dict[str, Any]:
    """{"hash", "revision", "totalKey", "totalSize"} of a snapshot file; EtcdError if etcd refuses it."""
    proc = subprocess.run([snapshot_tool(), "snapshot", "status", path, "-w", "json"], capture_output=True,
                          text=True, env=command_env(), timeout=600 + os.path.getsize(path) // (20 << 20),
                          check=False)
    if proc.returncode != 0:
        raise EtcdError(last_line(proc.stderr or proc.stdout) or "snapshot status failed")
    status: dict[str, Any] = json.loads(proc.stdout)
    # A store starts at revision 1, but the snapshot of one that never held a key says 0; restored, it serves 1.
    status["revision"] = max(int(status.get("revision") or 0), 1)
    return status
