"""Units for etcd self-healing: learner promotion on every etcd host, the spare watch on spares.

Pure functions returning text (absolute host path -> content), so every target ships the same
units and the unit tests check the policy without Pulumi. The units start the host agent's
`etcd-member-promote` and `etcd-spare-watch`; etcd.service's ExecStartPre,
`kcp-host etcd-member-recovery`, queues the promote unit after every start.
docs/self-healing.md has the decision table.
"""

from __future__ import annotations

from kcp_host.contract import AGENT, ClusterEnv, env_name

UNIT_DIR = "/etc/systemd/system"
PROMOTE_SERVICE = f"{UNIT_DIR}/etcd-member-promote.service"
SPARE_SERVICE = f"{UNIT_DIR}/etcd-spare-watch.service"
SPARE_TIMER = f"{UNIT_DIR}/etcd-spare-watch.timer"

# etcd's own TimeoutStartSec (templates/etcd.service.j2): a spare's takeover waits for it.
ETCD_START_TIMEOUT_SECONDS = 300
# etcd-spare-watch waits for the replacement lock, then for etcd.service to start; its limit covers both.
_SPARE_RUN_LIMIT_SECONDS = ClusterEnv.lock_wait_seconds + ETCD_START_TIMEOUT_SECONDS + 30
_MIN_CHECK_INTERVAL_SECONDS = 5


def _positive(what: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: {value!r} is not allowed (an integer >= {minimum} is)")
    return value


def promote_unit(promote_timeout_seconds: int = ClusterEnv.promote_timeout_seconds) -> str:
    """The oneshot that promotes this member once it has caught up.

    It has no [Install] section: etcd-member-recovery queues it (`systemctl start --no-block`)
    before every etcd start, also after Restart=always, and After= makes it wait until etcd is
    ready. PartOf= stops a running promotion when etcd stops, so it never outlives its etcd.
    """
    timeout = _positive("promote timeout seconds", promote_timeout_seconds, 10)
    return (
        "# Rendered by resilient-control-plane: queued by etcd-member-recovery before every etcd start.\n"
        "[Unit]\n"
        "Description=Record this etcd member's ID and promote it from learner once caught up\n"
        "After=etcd.service\n"
        "PartOf=etcd.service\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"Environment={env_name(ClusterEnv, 'promote_timeout_seconds')}={timeout}\n"
        f"ExecStart={AGENT} etcd-member-promote\n"
        f"TimeoutStartSec={timeout + 60}\n"
        # A learner left unpromoted (a run that timed out, or one systemd failed to start) is
        # retried now rather than at the next etcd start.
        "Restart=on-failure\n"
        "RestartSec=5s\n"
    )


def member_recovery_files(promote_timeout_seconds: int = ClusterEnv.promote_timeout_seconds) -> dict[str, str]:
    """Files every etcd host (members and spares) needs besides etcd.service itself."""
    return {PROMOTE_SERVICE: promote_unit(promote_timeout_seconds)}


def spare_watch_service(takeover_after_seconds: int) -> str:
    """One health check of the members; takes over a slot once a member is overdue."""
    after = _positive("spare takeover after seconds", takeover_after_seconds, 30)
    return (
        "# Rendered by resilient-control-plane: bare-metal spare, started by etcd-spare-watch.timer.\n"
        "[Unit]\n"
        "Description=Take over the slot of an etcd member unhealthy for over "
        f"{after}s\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        f"ConditionPathExists={ClusterEnv.PATH}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"Environment={env_name(ClusterEnv, 'spare_takeover_after_seconds')}={after}\n"
        f"ExecStart={AGENT} etcd-spare-watch\n"
        f"TimeoutStartSec={_SPARE_RUN_LIMIT_SECONDS}\n"
    )


def spare_watch_timer(check_interval_seconds: int) -> str:
    """Runs the check a fixed time after the previous one ended, so runs never overlap."""
    every = _positive("spare check interval seconds", check_interval_seconds, _MIN_CHECK_INTERVAL_SECONDS)
    return (
        "# Rendered by resilient-control-plane: bare-metal spare.\n"
        "[Unit]\n"
        f"Description=Check etcd members' health from this spare every {every}s\n"
        "\n"
        "[Timer]\n"
        f"OnBootSec={every}\n"
        f"OnUnitInactiveSec={every}\n"
        "AccuracySec=1s\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def spare_watch_files(takeover_after_seconds: int, check_interval_seconds: int) -> dict[str, str]:
    """The spare's watch service and timer (absolute host path -> content).

    A member must look dead for several checks before a spare acts: a takeover is a
    membership change that the stack configuration has to follow, so one missed check
    (a slow fsync, a restart) must not trigger it.
    """
    _positive("spare check interval seconds", check_interval_seconds, _MIN_CHECK_INTERVAL_SECONDS)
    if takeover_after_seconds < 2 * check_interval_seconds:
        raise ValueError(
            f"spare takeover after seconds: {takeover_after_seconds!r} is not allowed with a check interval of "
            f"{check_interval_seconds}s (at least two checks, >= {2 * check_interval_seconds}, are)"
        )
    return {
        SPARE_SERVICE: spare_watch_service(takeover_after_seconds),
        SPARE_TIMER: spare_watch_timer(check_interval_seconds),
    }
