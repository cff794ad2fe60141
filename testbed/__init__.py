"""Local test bed: real Debian hosts (systemd-nspawn in network namespaces).

See `testbed.sandbox.Sandbox` for the API and `scripts/sandbox` for the CLI.
"""

from testbed.image import ensure_image
from testbed.sandbox import LOCAL_STACK_HOSTS, Sandbox, SshError

__all__ = ["LOCAL_STACK_HOSTS", "Sandbox", "SshError", "ensure_image"]
