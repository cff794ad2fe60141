"""A stand-in etcdctl and a throwaway etcd host layout for running the host agent in unit tests.

The host's cluster.env is written through kcp_host.contract, exactly as the renderer writes it.
The stand-in answers `member list -w json`, `endpoint health` and `get` from files, refuses everything
else, and logs every call, so a test can show that a subcommand changed no membership.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcp_host.contract import ClusterEnv, render_env

ROOT = Path(__file__).resolve().parents[2]
FAKE_ETCDCTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/calls"
ep=""
for a in "$@"; do case $a in --endpoints=*) ep=${a#--endpoints=} ;; esac; done
case " $* " in
*" member list "*) [[ -f $FAKE_DIR/members.json ]] && cat "$FAKE_DIR/members.json" ;;
*" endpoint health "*) grep -qxF "$ep" "$FAKE_DIR/healthy" 2>/dev/null ;;
*" get "*) if [[ -f $FAKE_DIR/kv.json ]]; then cat "$FAKE_DIR/kv.json"; else echo '{"header":{}}'; fi ;;
*" version "*) printf 'etcdctl version: %s\nAPI version: 3.5\n' "${FAKE_VERSION:-3.5.16}" ;;
*) exit 1 ;;
esac
"""

# Never the machine's own systemd: queries say "no", actions are only logged.
FAKE_SYSTEMCTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/systemctl"
case $1 in is-*) exit 1 ;; esac
exit 0
"""

PEER = {h: f"https://10.9.9.1{i}:2380" for i, h in enumerate(["h1", "h2", "h3", "spare1"], 1)}
CLIENT = {h: f"https://10.9.9.1{i}:2379" for i, h in enumerate(["h1", "h2", "h3", "spare1"], 1)}
BBOLT_MAGIC = 0xED0CDAED


def started(member_id: str, name: str) -> dict[str, Any]:
    """A running voter, as `member list -w json` shows it (IDs given in hex, as etcdctl prints them)."""
    return {"ID": int(member_id, 16), "name": name, "peerURLs": [PEER[name]], "clientURLs": [CLIENT[name]]}


def never_started(member_id: str, name: str) -> dict[str, Any]:
    """A bootstrap voter that never ran: its name, but no client URLs yet."""
    return {"ID": int(member_id, 16), "name": name, "peerURLs": [PEER[name]]}


def unstarted_learner(member_id: str, peer_of: str) -> dict[str, Any]:
    """A learner added for a host whose etcd has not started: no name, no client URLs."""
    return {"ID": int(member_id, 16), "peerURLs": [PEER[peer_of]], "isLearner": True}


@dataclass
class Host:
    """One etcd host's files (member h1 unless told), a stand-in etcdctl, what the members answer."""

    root: Path
    name: str = "h1"

    def __post_init__(self) -> None:
        (self.root / "fake").mkdir()
        etcdctl = self.root / "etcdctl"
        etcdctl.write_text(FAKE_ETCDCTL)
        etcdctl.chmod(0o755)
        (self.root / "bin").mkdir()
        systemctl = self.root / "bin" / "systemctl"
        systemctl.write_text(FAKE_SYSTEMCTL)
        systemctl.chmod(0o755)
        env = ClusterEnv(
            cluster_name="t", member_name=self.name, peer_url=PEER[self.name], client_url=CLIENT[self.name],
            members=tuple(f"{h}={PEER[h]}" for h in ("h1", "h2", "h3")),
            client_endpoints=tuple(CLIENT[h] for h in ("h1", "h2", "h3")),
            etcd_ca="/nonexistent/ca.crt", etcd_cert="/nonexistent/c.crt", etcd_key="/nonexistent/c.key",
            data_dir=str(self.data), join_env=str(self.root / "join.env"),
            cluster_formed_file=str(self.root / "cluster-formed"), state_dir=str(self.root / "state"),
            restored_file=str(self.root / "restored"), etcdctl=str(etcdctl))
        (self.root / "cluster.env").write_text(render_env(env, "unit-test host"))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def with_data(self, db_magic: int = BBOLT_MAGIC, member_id: str | None = None) -> Host:
        (self.data / "member" / "wal").mkdir(parents=True)
        (self.data / "member" / "snap").mkdir()
        (self.data / "member" / "wal" / "0000000000000000-0000000000000000.wal").write_bytes(b"\0" * 64)
        page = bytes(16) + struct.pack("<I", db_magic)
        (self.data / "member" / "snap" / "db").write_bytes(page.ljust(8192, b"\0"))
        if member_id:
            (self.data / "member" / "kcp-member-id").write_text(member_id + "\n")
        return self

    def formed(self) -> Host:
        (self.root / "cluster-formed").write_text("")
        return self

    def restored(self) -> Host:
        (self.root / "restored").write_text("new-cluster-token\n")
        return self

    def peers(self, *members: dict[str, Any], healthy: tuple[str, ...] = ()) -> Host:
        (self.root / "fake" / "members.json").write_text(json.dumps({"header": {}, "members": list(members)}))
        (self.root / "fake" / "healthy").write_text("".join(f"{CLIENT[h]}\n" for h in healthy))
        return self

    def marked_removed(self, name: str) -> Host:
        """What etcd-reconcile-members leaves for a member the stack dropped: kcp/removed/NAME = its peer URL."""
        value = base64.b64encode(PEER[name].encode()).decode()
        key = base64.b64encode(f"kcp/removed/{name}".encode()).decode()
        (self.root / "fake" / "kv.json").write_text(json.dumps({"header": {}, "kvs": [{"key": key, "value": value}]}))
        return self

    def run(self, subcommand: str, *args: str, version: str = "3.5.16",
            **env: str) -> subprocess.CompletedProcess[str]:
        """`kcp-host SUBCOMMAND ARGS` as the host would run it, with the stand-ins on PATH."""
        full_env = {"PATH": f"{self.root / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                    "KCP_CLUSTER_ENV": str(self.root / "cluster.env"),
                    "FAKE_DIR": str(self.root / "fake"), "FAKE_VERSION": version, **env}
        return subprocess.run([sys.executable, "-m", "kcp_host", subcommand, *args], env=full_env,
                              capture_output=True, text=True, timeout=60, check=False)

    def calls(self) -> str:
        path = self.root / "fake" / "calls"
        return path.read_text() if path.exists() else ""
