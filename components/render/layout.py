"""Where host programs come from and where they live on every host (docs/host-layout.md)."""

from pathlib import Path

HOST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "host"
HOST_LIB = "/usr/local/lib/kcp"
