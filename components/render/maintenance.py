"""Units for etcd maintenance: `kcp-host etcd-maintain` on a timer on every etcd host.

Every member's timer runs the job; each run watches the quota of its own member (a warning in the
journal at 80 %, a failed unit at 95 %), and only the raft leader's run defragments, one member at
a time, those above the threshold (kcp_host/maintain.py, docs/maintenance.md).
"""

from __future__ import annotations

from kcp_host.contract import AGENT, ClusterEnv

UNIT_DIR = "/etc/systemd/system"
SERVICE = f"{UNIT_DIR}/etcd-maintain.service"
TIMER = f"{UNIT_DIR}/etcd-maintain.timer"
# Clouds start only etcd-backup.timer at boot (kcp-host cloud-boot): it pulls this timer in.
BACKUP_TIMER_DROP_IN = f"{UNIT_DIR}/etcd-backup.timer.d/10-etcd-maintain.conf"

# Every 4 hours: often enough that the quota watch warns long before a growing database reaches
# NOSPACE, and a run that finds nothing above the threshold costs one `endpoint status` per member.
# Randomized by up to an hour per host: the members' runs do not coincide (only the leader acts, the
# others exit at once), runs do not line up with the backup's wall-clock slots (a defrag waits for a
# running backup), and clusters sharing disks or hypervisors do not all defragment at the same moment.
SCHEDULE = "*-*-* 00/4:00:00"
RANDOM_DELAY = "1h"
# Three members, each: up to 600 s waiting for a backup, a 280 s defrag, 120 s until healthy.
RUN_LIMIT_SECONDS = 3 * (600 + 280 + 120) + 300


def service_unit() -> str:
    return (
        "# Rendered by resilient-control-plane: one etcd maintenance run.\n"
        "[Unit]\n"
        "Description=etcd quota watch and defragmentation, one member at a time (the leader acts)\n"
        "After=network-online.target etcd.service\n"
        "Wants=network-online.target\n"
        f"ConditionPathExists={ClusterEnv.cluster_formed_file}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={AGENT} etcd-maintain\n"
        # 3: refused with nothing changed (a voter unhealthy, a backup running); the next run retries.
        # 1 (the quota at 95 %, an alarm, a failed defrag) leaves the unit failed.
        "SuccessExitStatus=3\n"
        f"TimeoutStartSec={RUN_LIMIT_SECONDS}\n"
        "Nice=10\n"
        "PrivateTmp=yes\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=full\n"
    )


def timer_unit() -> str:
    return (
        "# Rendered by resilient-control-plane: etcd maintenance every 4 hours, randomized per host.\n"
        "[Unit]\n"
        "Description=etcd maintenance schedule\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar={SCHEDULE}\n"
        f"RandomizedDelaySec={RANDOM_DELAY}\n"
        "AccuracySec=1min\n"
        "Unit=etcd-maintain.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def maintenance_files() -> dict[str, str]:
    """Absolute path on an etcd host -> content."""
    return {
        SERVICE: service_unit(),
        TIMER: timer_unit(),
        BACKUP_TIMER_DROP_IN: "# Rendered by resilient-control-plane: the maintenance timer runs wherever "
                              "backups do.\n[Unit]\nWants=etcd-maintain.timer\n",
    }
