"""The host agent as every host gets it: one executable zip of the kcp_host package.

One file (`/usr/local/lib/kcp/kcp-host`, a Python zipapp) rather than a tree of modules: it is
replaced as a whole, so a host never runs a mix of two versions or a module that a newer
version dropped, and imports from a zip never use stale bytecode caches. The archive is built
with fixed timestamps and order, so the same sources give the same bytes and a second
`pulumi up` sees no change. Its modules are stored, not deflated: every bundle is gzip'd as one
stream, which compresses them better together than each alone (18 % smaller), and the clouds'
programs secret has to hold it in two pieces of 64 KiB (a third piece would change every boot
script).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from components.render.hostfiles import HostFile
from kcp_host.contract import AGENT

SOURCE = Path(__file__).resolve().parents[2] / "kcp_host"
# -I: isolated from PYTHON* variables and the user's site-packages; the agent runs as root.
SHEBANG = b"#!/usr/bin/python3 -I\n"
MAIN = ("import sys\n"
        "if sys.version_info < (3, 11):\n"
        "    sys.exit(f'kcp-host: needs Python 3.11 or newer, this is {sys.version.split()[0]}')\n"
        "from kcp_host.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
# The agent's one dependency: Debian and Ubuntu images carry python3, minimal ones may not.
ENSURE_PYTHON = ("{ command -v python3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                 "apt-get install -y -qq --no-install-recommends python3 >/dev/null; }; }")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def agent_sources() -> dict[str, str]:
    """Archive path -> source of every module of the agent."""
    sources = {f"kcp_host/{path.name}": path.read_text(encoding="utf-8") for path in sorted(SOURCE.glob("*.py"))}
    return {"__main__.py": MAIN, **sources}


def agent_zipapp() -> bytes:
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, text in agent_sources().items():
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, text.encode("utf-8"))
    return SHEBANG + raw.getvalue()


def agent_files() -> list[HostFile]:
    """What every host gets of the agent (bare metal over SSH, clouds from the programs secret)."""
    return [HostFile(AGENT, agent_zipapp(), 0o755)]
