"""Files for scheduled etcd backups: the timer on every etcd host, its settings, and the
backup host's forced-command key entry.

Pure functions returning text, so every target ships the same backup job and the unit tests
check the policy (one leader-only job per interval, write-only access) without Pulumi.
The units start the host agent's `etcd-backup` (which runs `etcd-backup-verify`); the backup
host's key runs its `etcd-backup-receive`. docs/backups.md describes the destination layouts
these settings point at.
"""

from __future__ import annotations

import hashlib
import re
import shlex

from kcp_host.contract import AGENT, DELTA_UNIT, DELTA_UNIT_FILE, PKI, BackupEnv, render_env

SERVICE = "/etc/systemd/system/etcd-backup.service"
# etcd's backend quota (ETCD_QUOTA_BACKEND_BYTES, render/etcd.py) is 8 GiB, and a snapshot is the backend file:
# twice that leaves room for the pages a database over its quota still holds.
SNAPSHOT_MAX_BYTES = 16 * 1024**3
TIMER = "/etc/systemd/system/etcd-backup.timer"

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_PUBLIC_KEY = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/]+={0,3}( [^\s\"]*)?$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]+$")
_DEST = re.compile(r"^(ssh://[A-Za-z0-9._-]+@[A-Za-z0-9.:\[\]-]+/[A-Za-z0-9._/-]+|(gs|s3)://[a-z0-9._-]+(/[A-Za-z0-9._/-]*)?)$")


def _require(pattern: re.Pattern[str], what: str, value: str) -> str:
    if not pattern.match(value):
        raise ValueError(f"{what}: {value!r} is not allowed here (must match {pattern.pattern})")
    return value


def ssh_destination(user: str, address: str, backup_path: str, cluster_name: str) -> str:
    """The bare-metal KCP_BACKUP_DEST; the receiver's --root is the same folder."""
    return f"ssh://{user}@{address}{receiver_root(backup_path, cluster_name)}"


def receiver_root(backup_path: str, cluster_name: str) -> str:
    """Each cluster writes only below its own folder on the backup host."""
    _require(_PATH, "backup path", backup_path)
    _require(_SAFE, "cluster name", cluster_name)
    return f"{backup_path.rstrip('/')}/{cluster_name}"


def on_calendar(interval_minutes: int) -> str | None:
    """A wall-clock schedule when the interval divides an hour or a day, else None.

    Wall-clock slots fire at the same moment on every member, so exactly one of them (the
    leader) takes the slot's snapshot; a relative timer would drift apart per host.
    """
    if interval_minutes < 60 and 60 % interval_minutes == 0:
        return f"*-*-* *:00/{interval_minutes}:00"
    if interval_minutes % 60 == 0 and 1440 % interval_minutes == 0:
        return f"*-*-* 00/{interval_minutes // 60}:00:00"
    return None


def timer_unit(cluster_name: str, interval_minutes: int) -> str:
    """Persistent: a slot missed while the host was down runs at boot."""
    if interval_minutes < 1:
        raise ValueError(f"backup interval: {interval_minutes} minutes is not allowed (at least 1)")
    calendar = on_calendar(interval_minutes)
    schedule = (f"OnCalendar={calendar}\n" if calendar else
                f"OnBootSec={interval_minutes}min\nOnUnitActiveSec={interval_minutes}min\n")
    return (
        "# Rendered by resilient-control-plane: etcd snapshot every "
        f"{interval_minutes} minutes (the leader acts, other members exit 0).\n"
        "[Unit]\n"
        f"Description=etcd backup schedule ({cluster_name} control plane)\n\n"
        "[Timer]\n"
        f"{schedule}"
        "Persistent=true\n"
        "RandomizedDelaySec=20s\n"
        "AccuracySec=1s\n"
        "Unit=etcd-backup.service\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def service_unit(cluster_name: str, interval_minutes: int) -> str:
    """Oneshot: a failed snapshot, verification or upload leaves the unit failed (visible, alertable)."""
    return (
        "# Rendered by resilient-control-plane: one etcd backup run.\n"
        "[Unit]\n"
        f"Description=etcd snapshot, verification and upload ({cluster_name} control plane)\n"
        "After=network-online.target etcd.service\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={AGENT} etcd-backup\n"
        f"TimeoutStartSec={max(interval_minutes * 60, 900)}\n"
        "StateDirectory=etcd-backup\n"
        "StateDirectoryMode=0700\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        "PrivateTmp=yes\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=full\n"
        "ReadWritePaths=-/etc/etcd/backup-ssh\n"
    )


def delta_unit(cluster_name: str) -> str:
    """Always running on every member; only the leader's archives (kcp_host/archive.py). It restarts itself after
    any failure: the backup host says where to resume, so a restart loses nothing."""
    return (
        "# Rendered by resilient-control-plane: the delta log (docs/backups.md).\n"
        "[Unit]\n"
        f"Description=etcd delta log archiver ({cluster_name} control plane)\n"
        "After=network-online.target etcd.service\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart={AGENT} etcd-delta-archive\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "StateDirectory=etcd-backup\n"
        "StateDirectoryMode=0700\n"
        "PrivateTmp=yes\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=full\n"
        "ReadWritePaths=-/etc/etcd/backup-ssh\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def delta_enable_command(cluster_name: str, delta_seconds: int) -> str:
    """Enables and restarts the archiver; names its unit's digest and the interval, so that a change of either runs
    it again (the archiver reads backup.env once, as it starts)."""
    digest = hashlib.sha256(delta_unit(cluster_name).encode()).hexdigest()[:12]
    return (f"systemctl daemon-reload && systemctl enable {DELTA_UNIT} && systemctl restart {DELTA_UNIT}  "
            f"# every {delta_seconds}s, unit {digest}")


def backup_env(dest: str, verify: bool, ssh_key_path: str | None, delta_seconds: int = 0) -> str:
    """/etc/etcd/backup.env (kcp_host.contract.BackupEnv)."""
    _require(_DEST, "backup destination", dest)
    if dest.startswith("ssh://") and not ssh_key_path:
        raise ValueError(f"backup destination {dest!r} needs ssh_key_path (the host's key for the receiver)")
    if delta_seconds and not 1 <= delta_seconds <= 300:
        raise ValueError(f"delta log every {delta_seconds}s is not allowed (1..300 s)")
    return render_env(BackupEnv(
        dest=dest, cert=f"{PKI}/backup-client.crt", key=f"{PKI}/backup-client.key", verify=verify,
        ssh_key=_require(_PATH, "backup ssh key path", ssh_key_path) if ssh_key_path else "",
        delta_seconds=delta_seconds,
    ), "Rendered by resilient-control-plane; read by kcp-host etcd-backup (kcp_host/contract.py).")


def backup_host_files(cluster_name: str, dest: str, interval_minutes: int, verify: bool,
                      ssh_key_path: str | None, delta_seconds: int = 0) -> dict[str, str]:
    """Absolute path on an etcd host -> content, for the backup timer and, with `delta_seconds`, the delta log."""
    _require(_SAFE, "cluster name", cluster_name)
    return {
        BackupEnv.PATH: backup_env(dest, verify, ssh_key_path, delta_seconds),
        SERVICE: service_unit(cluster_name, interval_minutes),
        TIMER: timer_unit(cluster_name, interval_minutes),
        **({DELTA_UNIT_FILE: delta_unit(cluster_name)} if delta_seconds else {}),
    }


def known_hosts(address: str, host_key: str) -> str:
    """The etcd hosts' known_hosts for the receiver: the backup host's pinned key and nothing else, so
    `kcp-host etcd-backup` connects with StrictHostKeyChecking=yes (kcp_host/destinations.py)."""
    _require(_HOST, "backup host address", address)
    return f"{address} {_require(_PUBLIC_KEY, 'backup host key', host_key)}\n"


def backup_receiver_authorized_key(public_key_openssh: str, backup_path: str, cluster_name: str,
                                   retain_recent: int, retain_daily: int,
                                   max_bytes: int = SNAPSHOT_MAX_BYTES) -> str:
    """One authorized_keys line: the etcd hosts' key can only run the receiver for this cluster.

    `restrict` turns off forwarding, PTYs and user rc; `command=` replaces whatever the client
    asks for, so the key grants "add new files below <path>/<cluster>" and nothing else, each
    snapshot at most `max_bytes` (its metadata at most 1 MiB), so the folder's size has a bound:
    (recent + daily + 3 bad + 2 in flight) snapshots.
    """
    key = _require(_PUBLIC_KEY, "backup public key", public_key_openssh.strip())
    if retain_recent < 1 or retain_daily < 0:
        raise ValueError(f"backup retention: recent={retain_recent} daily={retain_daily} is not allowed")
    if max_bytes < 1:
        raise ValueError(f"backup size bound: {max_bytes} bytes is not allowed")
    command = (f"{AGENT} etcd-backup-receive --root {shlex.quote(receiver_root(backup_path, cluster_name))} "
               f"--retain-recent {retain_recent} --retain-daily {retain_daily} --max-bytes {max_bytes}")
    return f'restrict,command="{command}" {key}\n'
