"""Monitoring: the agent's metrics units on every etcd host, and what a Prometheus needs to watch a cluster.

Every etcd host (member or spare) writes its metrics every 30 s (`kcp-metrics.timer` -> `kcp-host metrics`,
the file `/var/lib/kcp/metrics/kcp.prom`) and serves that file on port 2382 (`kcp-metrics-http.service` ->
`kcp-host metrics --serve`), next to etcd's own metrics on 2381. The alert rules are
`monitoring/alerts.yml` (their promtool tests beside them); `scrape_config` is the Prometheus job list
that matches them. docs/alerts.md says what each alert means and what to do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.render.etcd import METRICS_PORT, Member
from kcp_host.contract import AGENT, METRICS_HTTP_UNIT, ClusterEnv

UNIT_DIR = "/etc/systemd/system"
SERVICE = f"{UNIT_DIR}/kcp-metrics.service"
TIMER = f"{UNIT_DIR}/kcp-metrics.timer"
HTTP_SERVICE = f"{UNIT_DIR}/{METRICS_HTTP_UNIT}"
# Clouds start only etcd-backup.timer at boot (kcp-host cloud-boot): it pulls the metrics units in.
BACKUP_TIMER_DROP_IN = f"{UNIT_DIR}/etcd-backup.timer.d/20-kcp-metrics.conf"
UNITS = ("kcp-metrics.timer", METRICS_HTTP_UNIT)
AGENT_PORT: int = ClusterEnv.metrics_port  # the contract's default
COLLECT_EVERY_SECONDS = 30
RULES = Path(__file__).resolve().parents[2] / "monitoring" / "alerts.yml"
RULE_TESTS = RULES.with_name("alerts_test.yml")


def service_unit(backup_interval_minutes: int) -> str:
    """Root: it reads the member's key (for `member list`), the backup job's status.json and the certificates."""
    return (
        "# Rendered by resilient-control-plane: this host's metrics for Prometheus (docs/alerts.md).\n"
        "[Unit]\n"
        "Description=Write this etcd host's backup, drill, takeover, membership and certificate metrics\n"
        "After=network-online.target etcd.service\n"
        f"ConditionPathExists={ClusterEnv.PATH}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={AGENT} metrics --backup-interval-seconds {backup_interval_minutes * 60}\n"
        "TimeoutStartSec=60\n"
        "StateDirectory=kcp/metrics\n"
        "StateDirectoryMode=0755\n"
        "Nice=10\n"
        "PrivateTmp=yes\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=full\n"
        "ProtectHome=read-only\n"
    )


def timer_unit() -> str:
    return (
        "# Rendered by resilient-control-plane: this host's metrics every "
        f"{COLLECT_EVERY_SECONDS} s.\n"
        "[Unit]\n"
        "Description=etcd host metrics schedule\n"
        "\n"
        "[Timer]\n"
        "OnBootSec=20s\n"
        f"OnUnitActiveSec={COLLECT_EVERY_SECONDS}s\n"
        "AccuracySec=1s\n"
        "Unit=kcp-metrics.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def http_unit() -> str:
    """No privileges at all: it reads cluster.env (its address and port) and the metrics file, both 0644."""
    return (
        "# Rendered by resilient-control-plane: serves the metrics file (docs/alerts.md).\n"
        "[Unit]\n"
        f"Description=Serve this etcd host's metrics on port {AGENT_PORT} (its address and 127.0.0.1)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        f"ConditionPathExists={ClusterEnv.PATH}\n"
        # The member's address may arrive after boot (AWS attaches its interface): retry until it binds.
        "StartLimitIntervalSec=0\n"
        "\n"
        "[Service]\n"
        f"ExecStart={AGENT} metrics --serve\n"
        "Restart=always\n"
        "RestartSec=5\n"
        "DynamicUser=yes\n"
        "CapabilityBoundingSet=\n"
        "NoNewPrivileges=yes\n"
        "PrivateTmp=yes\n"
        "PrivateDevices=yes\n"
        "ProtectSystem=strict\n"
        "ProtectHome=yes\n"
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n"
        "MemoryMax=64M\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def monitoring_files(backup_interval_minutes: int) -> dict[str, str]:
    """Absolute path on an etcd host -> content."""
    return {
        SERVICE: service_unit(backup_interval_minutes),
        TIMER: timer_unit(),
        HTTP_SERVICE: http_unit(),
        BACKUP_TIMER_DROP_IN: "# Rendered by resilient-control-plane: metrics run wherever backups do.\n"
                              f"[Unit]\nWants={' '.join(UNITS)}\n",
    }


def enable_command() -> str:
    """Enables and (re)starts the timer and the server; names their units' digest, so that a change of either runs
    it again. The oneshot service (which carries the backup interval) needs no restart: each run reads it anew."""
    digest = hashlib.sha256((timer_unit() + http_unit()).encode()).hexdigest()[:12]
    units = " ".join(UNITS)
    return f"systemctl daemon-reload && systemctl enable {units} && systemctl restart {units}  # units {digest}"


def scrape_config(cluster: str, members: Sequence[Member], spares: Sequence[Member] = (),
                  interval: str = "30s") -> list[dict[str, Any]]:
    """Prometheus' `scrape_configs` for one cluster, as the rules expect them: job `etcd` (etcd's own metrics, the
    stack's members only: a spare's etcd is stopped until it takes over) and job `kcp` (the agent's, every etcd
    host), each target labelled with `cluster` and `member`."""
    def targets(hosts: Sequence[Member], port: int) -> list[dict[str, Any]]:
        return [{"targets": [f"{h.address}:{port}"], "labels": {"cluster": cluster, "member": h.name}} for h in hosts]

    return [{"job_name": "etcd", "scrape_interval": interval, "static_configs": targets(members, METRICS_PORT)},
            {"job_name": "kcp", "scrape_interval": interval,
             "static_configs": targets([*members, *spares], AGENT_PORT)}]
