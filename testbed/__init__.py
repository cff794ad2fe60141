"""Local test bed: real Debian hosts (systemd-nspawn in network namespaces), trixie or bookworm.

See `testbed.sandbox.Sandbox` for the API and `scripts/sandbox` for the CLI.
"""

from testbed.image import DEFAULT_SUITE, SUITES, ensure_image
from testbed.sandbox import LOCAL_STACK_HOSTS, Sandbox, SshError

__all__ = ["DEFAULT_SUITE", "LOCAL_STACK_HOSTS", "SUITES", "Sandbox", "SshError", "ensure_image"]
