"""A cgroup of its own for each test host's systemd-nspawn.

nspawn with --keep-unit places the container under the cgroup it was started in, which it reads from the
unified (`0::`) line of /proc/self/cgroup, and creates `payload` and `supervisor` beside each other there,
in the `name=systemd` hierarchy too. Without a host systemd that cgroup is the root for every container:
all of them would then share /payload/system.slice, so one unit name in two containers shares one cgroup,
a stop in one waits for the same unit of the others to leave it, and a start can lose its cgroup to another
container's cleanup (status 219/CGROUP). Starting each nspawn in its own unified cgroup gives every
container its own tree in both hierarchies.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from testbed.system import run

#: The cgroup-v1 `name=systemd` hierarchy of a machine without a host systemd (this test bed's).
LEGACY_SYSTEMD = Path("/sys/fs/cgroup/systemd")
#: Where the test bed mounts the unified hierarchy when the machine has not (it has no controllers here).
UNIFIED = Path("/run/kcp-sandbox-cgroup2")


def needed() -> bool:
    """Only a machine with a legacy `name=systemd` hierarchy and no systemd of its own shares one tree."""
    return (LEGACY_SYSTEMD / "cgroup.procs").exists() and not Path("/run/systemd/system").exists()


def spawn_prefix(group: str) -> list[str]:
    """An argv prefix that moves the process into the unified cgroup GROUP (a relative path), then execs the rest."""
    if not needed():
        return []
    if not os.path.ismount(UNIFIED):
        UNIFIED.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "cgroup2", "cgroup2", str(UNIFIED)])
    remove(group)  # what a killed container of this name left behind
    (UNIFIED / group).mkdir(parents=True, exist_ok=True)
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(UNIFIED / group)]


def remove(group: str) -> None:
    """Remove GROUP from both hierarchies, deepest first; a directory some process still uses stays."""
    for root in (LEGACY_SYSTEMD, UNIFIED):
        top = root / group
        if not top.is_dir():
            continue
        for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
