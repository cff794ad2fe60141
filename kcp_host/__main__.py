"""`python3 -m kcp_host SUBCOMMAND ...`: the same as /usr/local/lib/kcp/kcp-host."""

import sys

from kcp_host.cli import main

sys.exit(main(sys.argv[1:]))
