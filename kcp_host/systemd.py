"""The few systemctl calls the agent makes; systemctl is found on PATH (tests put a stand-in there)."""

from __future__ import annotations

import argparse
import subprocess

from kcp_host.contract import AGENT_SERVICES
from kcp_host.log import Abort, log


def systemctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=check, timeout=600)


def is_active(unit: str) -> bool:
    return systemctl("is-active", "--quiet", unit).returncode == 0


def is_enabled(unit: str) -> bool:
    return systemctl("is-enabled", "--quiet", unit).returncode == 0


def has_unit(unit: str) -> bool:
    return systemctl("cat", unit).returncode == 0


def show(unit: str, prop: str) -> str:
    return systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def act(*args: str) -> None:
    """A systemctl action the caller cannot go on without: Abort(1) with systemctl's own message."""
    proc = systemctl(*args)
    if proc.returncode != 0:
        raise Abort(1, f"systemctl {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def restart_agent_services(argv: list[str]) -> int:
    """After a new agent build: a long-running service keeps running the build it started with until it restarts.
    One that is not running starts on the new build anyway; etcd never runs the agent for long and is not touched."""
    argparse.ArgumentParser(prog="kcp-host restart-agent-services", description=restart_agent_services.__doc__
                            ).parse_args(argv)
    for unit in AGENT_SERVICES:
        if is_active(unit):
            act("restart", unit)
            log(f"restarted {unit}: it runs this build now")
    return 0
