"""The boot path of cloud machines: the startup script (GCE) / user data (AWS).

Pure functions returning text. The startup script writes only the bootstrap
(`scripts/host/kcp-bootstrap`), its non-secret settings (`/etc/kcp/boot.env`, a `BootEnv`), a
oneshot unit that runs it now and at every boot, and the refresh timer that brings later changes.
The bootstrap fetches the host agent from the secret store and hands over to `kcp-host cloud-boot`;
every secret arrives later, in bundles fetched from the secret store. So the script stays small
(AWS user data: 16 KiB) and secret-free.
"""

from __future__ import annotations

from pathlib import Path

from components.render.agent import ENSURE_PYTHON
from kcp_host.contract import (
    AGENT,
    LIB,
    MEMBERSHIP_TIMER_FILE,
    MEMBERSHIP_WATCH,
    MEMBERSHIP_WATCH_SECONDS,
    BootEnv,
    render_env,
)

BOOTSTRAP = Path(__file__).resolve().parents[2] / "scripts" / "host" / "kcp-bootstrap"
BOOT_UNIT = "/etc/systemd/system/kcp-boot.service"
REFRESH = "kcp-cloud-refresh"
PROVIDERS = ("gce", "aws")


def boot_env(env: BootEnv) -> str:
    return render_env(env, "Rendered by resilient-control-plane: the cloud boot path's settings (no secret).")


def boot_unit() -> str:
    """Runs the boot path at every boot: re-attaches, re-mounts and re-forwards what a reboot lost."""
    return (
        "# Rendered by resilient-control-plane: the cloud boot path (kcp-bootstrap, then kcp-host cloud-boot).\n"
        "[Unit]\n"
        "Description=Control-plane boot: fetch the agent and bundles, attach disk and address, start roles\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "# The agent's one dependency.\n"
        f"ExecStartPre=/bin/bash -c '{ENSURE_PYTHON}'\n"
        f"ExecStart={LIB}/{BOOTSTRAP.name}\n"
        "TimeoutStartSec=3600\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def refresh_units(env: BootEnv) -> dict[str, str]:
    """`kcp-host cloud-refresh` every `refresh_seconds` (5 minutes), spread by up to a fifth of that. Frequent enough
    that a rotated key is everywhere within minutes (at most interval x machines, as they go one at a time), rare
    enough that the secret reads (one per bundle piece per machine and run) cost nothing and stay far under quotas.
    The spread keeps machines from reading at the same moment; the lock orders them anyway. Never during a boot."""
    return {
        f"/etc/systemd/system/{REFRESH}.service": (
            "# Rendered by resilient-control-plane: configuration, certificate and version changes, one machine at\n"
            "# a time (docs/cloud-targets.md). Start it to apply a change now.\n"
            "[Unit]\n"
            "Description=Control-plane refresh: re-fetch this machine's bundles, apply a change under the lock\n"
            "Requisite=kcp-boot.service\n"
            "After=kcp-boot.service\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            f"ExecStart={AGENT} cloud-refresh\n"
            "TimeoutStartSec=3600\n"
        ),
        f"/etc/systemd/system/{REFRESH}.timer": (
            "# Rendered by resilient-control-plane: runs the control-plane refresh.\n"
            "[Unit]\n"
            "Description=Control-plane refresh, every few minutes\n"
            "\n"
            "[Timer]\n"
            f"OnActiveSec={env.refresh_seconds}\n"
            f"OnUnitInactiveSec={env.refresh_seconds}\n"
            f"RandomizedDelaySec={env.refresh_seconds // 5}\n"
            "\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        ),
    }


def membership_units() -> dict[str, str]:
    """An etcd slot's watch, in its bundle (so running machines get it by refresh, and it goes with the role): every
    30 s it asks whether every voter answers and, only when one does not, whether the slot's bundle dropped it. A
    shrink deletes the dropped slots' machines at once; they leave etcd within about a minute instead of at the next
    refresh (up to about 7 minutes of 3 voters up out of 5, tolerating no failure). No secret is read while all
    answer."""
    return {
        f"/etc/systemd/system/{MEMBERSHIP_WATCH}.service": (
            "# Rendered by resilient-control-plane: members a shrink deleted leave etcd (docs/cloud-targets.md).\n"
            "[Unit]\n"
            "Description=Control-plane membership: when a voter is silent, remove the members the stack dropped\n"
            "After=etcd.service\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            f"ExecStart={AGENT} cloud-refresh --membership\n"
            "TimeoutStartSec=900\n"
        ),
        MEMBERSHIP_TIMER_FILE: (
            f"# Rendered by resilient-control-plane: the membership watch, every {MEMBERSHIP_WATCH_SECONDS} s.\n"
            "[Unit]\n"
            "Description=Control-plane membership watch\n"
            "\n"
            "[Timer]\n"
            f"OnActiveSec={MEMBERSHIP_WATCH_SECONDS}\n"
            f"OnUnitInactiveSec={MEMBERSHIP_WATCH_SECONDS}\n"
            "AccuracySec=1s\n"
            "\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        ),
    }


def _install(path: str, mode: int, content: str) -> str:
    """`install` replaces the file, never rewrites it in place: a bootstrap running since this boot (GCE runs
    the startup script at every boot) keeps reading the file it started with."""
    marker = "KCP_BOOT_EOF"
    if any(line == marker for line in content.splitlines()):
        raise ValueError(f"{path}: contains the heredoc marker {marker}")
    return f"install -m {mode:04o} /dev/stdin {path} <<'{marker}'\n{content.rstrip(chr(10))}\n{marker}\n"


def boot_script(env: BootEnv, max_bytes: int | None = None) -> str:
    """The machine's startup script; `max_bytes` is the cloud's limit (AWS user data: 16 KiB)."""
    if env.provider not in PROVIDERS:
        raise ValueError(f"boot provider {env.provider!r} is not allowed (one of {PROVIDERS})")
    script = (
        "#!/usr/bin/env bash\n"
        "# Rendered by resilient-control-plane: writes the boot path's bootstrap, its non-secret settings\n"
        "# and its unit, then runs it now and at every boot. No secret is in here.\n"
        "set -euo pipefail\n"
        f"install -d -m 0755 {LIB} {Path(BootEnv.PATH).parent}\n"
        + _install(f"{LIB}/{BOOTSTRAP.name}", 0o755, BOOTSTRAP.read_text())
        + _install(BootEnv.PATH, 0o644, boot_env(env))
        + _install(BOOT_UNIT, 0o644, boot_unit())
        + "".join(_install(path, 0o644, unit) for path, unit in refresh_units(env).items())
        + "systemctl daemon-reload\n"
        "systemctl enable kcp-boot.service\n"
        f"systemctl enable --now {REFRESH}.timer\n"
        "# --no-block: the boot path waits for etcd, which must not hold up the image's own first-boot jobs.\n"
        "systemctl start --no-block kcp-boot.service\n"
    )
    if max_bytes is not None and len(script.encode()) > max_bytes:
        raise ValueError(f"boot script is {len(script.encode())} bytes, over the cloud's limit of {max_bytes}")
    return script
