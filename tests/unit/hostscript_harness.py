"""A stand-in etcdctl and a throwaway etcd host layout for running scripts/host programs in unit tests.

The stand-in answers `member list` and `endpoint health` from files, refuses everything
else, and logs every call, so a test can show that a program changed no membership.
"""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "host"
FAKE_ETCDCTL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/calls"
ep=""
for a in "$@"; do case $a in --endpoints=*) ep=${a#--endpoints=} ;; esac; done
case " $* " in
*" member list "*) [[ -f $FAKE_DIR/members ]] && cat "$FAKE_DIR/members" ;;
*" endpoint health "*) grep -qxF "$ep" "$FAKE_DIR/healthy" 2>/dev/null ;;
*" version "*) printf 'etcdctl version: %s\nAPI version: 3.4\n' "${FAKE_VERSION:-3.4.23}" ;;
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


def started(member_id: str, name: str) -> str:
    return f"{member_id}, started, {name}, {PEER[name]}, {CLIENT[name]}, false"


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
        members = " ".join(f"{h}={PEER[h]}" for h in ("h1", "h2", "h3"))
        (self.root / "cluster.env").write_text("\n".join([
            "KCP_CLUSTER_NAME=t", f"KCP_MEMBER_NAME={self.name}", f"KCP_PEER_URL={PEER[self.name]}",
            f"KCP_CLIENT_URL={CLIENT[self.name]}", f'KCP_MEMBERS="{members}"',
            "KCP_CLIENT_ENDPOINTS=" + ",".join(CLIENT[h] for h in ("h1", "h2", "h3")),
            "KCP_ETCD_CA=/nonexistent/ca.crt", "KCP_ETCD_CERT=/nonexistent/c.crt", "KCP_ETCD_KEY=/nonexistent/c.key",
            f"KCP_DATA_DIR={self.data}", f"KCP_JOIN_ENV={self.root / 'join.env'}",
            f"KCP_CLUSTER_FORMED_FILE={self.root / 'cluster-formed'}", f"KCP_STATE_DIR={self.root / 'state'}",
            f"KCP_RESTORED_FILE={self.root / 'restored'}",
            f"KCP_ETCDCTL={etcdctl}", "",
        ]))

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

    def peers(self, *lines: str, healthy: tuple[str, ...] = ()) -> Host:
        (self.root / "fake" / "members").write_text("".join(f"{line}\n" for line in lines))
        (self.root / "fake" / "healthy").write_text("".join(f"{CLIENT[h]}\n" for h in healthy))
        return self

    def run(self, program: str, *args: str, version: str = "3.4.23",
            **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {"PATH": f"{self.root / 'bin'}:{os.environ['PATH']}",
                    "KCP_CLUSTER_ENV": str(self.root / "cluster.env"),
                    "FAKE_DIR": str(self.root / "fake"), "FAKE_VERSION": version, **env}
        return subprocess.run([str(HOST_SCRIPTS / program), *args], env=full_env, capture_output=True,
                              text=True, timeout=60, check=False)

    def calls(self) -> str:
        path = self.root / "fake" / "calls"
        return path.read_text() if path.exists() else ""


