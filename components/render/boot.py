"""The boot path of cloud machines: the startup script (GCE) / user data (AWS), and host programs.

Pure functions returning text. The startup script only writes the shared program
`scripts/host/cloud-boot`, the provider's small functions (`cloud-boot-<provider>.sh`), its
non-secret settings and a oneshot unit that runs them at this and every later boot; all
secrets arrive later as bundles fetched from the cloud's secret store. Host programs are
shipped as one more bundle (the same format as the host files), so a cloud VM ends with
exactly the `/usr/local/lib/kcp` that bare-metal hosts get over SSH.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from components.render.hostfiles import UNPACK_BUNDLE, HostFile
from components.render.layout import HOST_LIB as LIB
from components.render.layout import HOST_SCRIPTS

BOOT_ENV = "/etc/kcp/boot.env"
BOOT_UNIT = "/etc/systemd/system/kcp-boot.service"
PROVIDERS = ("gce", "aws")
_KEY = re.compile(r"^KCP_BOOT_[A-Z0-9_]+$")


def host_program_files() -> list[HostFile]:
    """Every program of scripts/host, as installed on bare metal: 0755 under /usr/local/lib/kcp."""
    return [HostFile(f"{LIB}/{path.name}", path.read_text(), 0o755)
            for path in sorted(HOST_SCRIPTS.iterdir()) if path.is_file()]


def boot_env(settings: Mapping[str, str]) -> str:
    """/etc/kcp/boot.env: shell-quoted KCP_BOOT_* values; the bundle format travels with them."""
    values = {"KCP_BOOT_UNPACK": UNPACK_BUNDLE, **settings}
    for key in values:
        if not _KEY.match(key):
            raise ValueError(f"boot setting {key!r} is not allowed (KCP_BOOT_[A-Z0-9_]+ is)")
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


def boot_unit() -> str:
    """Runs cloud-boot at every boot: re-attaches, re-mounts and re-forwards what a reboot lost."""
    return (
        "# Rendered by resilient-control-plane: the cloud boot path (scripts/host/cloud-boot).\n"
        "[Unit]\n"
        "Description=Control-plane boot: fetch bundles, attach disk and address, start roles\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart={LIB}/cloud-boot\n"
        "TimeoutStartSec=3600\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _heredoc(path: str, content: str, marker: str) -> str:
    if any(line == marker for line in content.splitlines()):
        raise ValueError(f"{path}: contains the heredoc marker {marker}")
    return f"cat >{path} <<'{marker}'\n{content.rstrip(chr(10))}\n{marker}\n"


def boot_script(provider: str, settings: Mapping[str, str], max_bytes: int | None = None) -> str:
    """The machine's startup script; `max_bytes` is the cloud's limit (AWS user data: 16 KiB)."""
    if provider not in PROVIDERS:
        raise ValueError(f"boot provider {provider!r} is not allowed (one of {PROVIDERS})")
    settings = {"KCP_BOOT_PROVIDER": provider, **settings}
    files = {
        f"{LIB}/cloud-boot": (HOST_SCRIPTS / "cloud-boot").read_text(),
        f"{LIB}/cloud-boot-{provider}.sh": (HOST_SCRIPTS / f"cloud-boot-{provider}.sh").read_text(),
        BOOT_ENV: boot_env(settings),
        BOOT_UNIT: boot_unit(),
    }
    script = (
        "#!/usr/bin/env bash\n"
        "# Rendered by resilient-control-plane: writes the shared boot program, its provider functions\n"
        "# and non-secret settings, then runs it now and at every boot. No secret is in here.\n"
        "set -euo pipefail\n"
        f"install -d -m 0755 {LIB} /etc/kcp\n"
        + "".join(_heredoc(path, content, f"KCP_BOOT_EOF_{i}") for i, (path, content) in enumerate(files.items()))
        + f"chmod 0755 {LIB}/cloud-boot {LIB}/cloud-boot-{provider}.sh\n"
        "systemctl daemon-reload\n"
        "systemctl enable kcp-boot.service\n"
        "# --no-block: the boot path waits for etcd, which must not hold up the image's own first-boot jobs.\n"
        "systemctl start --no-block kcp-boot.service\n"
    )
    if max_bytes is not None and len(script.encode()) > max_bytes:
        raise ValueError(f"boot script is {len(script.encode())} bytes, over the cloud's limit of {max_bytes}")
    return script
