"""firewall-apply: load the host firewall the program shipped, unless it would cut the program off.

The rules arrive beside the live ones (`firewall.nft.new`); they replace them only when the SSH
connection applying them (the machine running `pulumi up`) is still allowed by them. The program
applies firewalls host after host, so a change that would lock the operator out stops at the first
host, with nothing changed there or on the hosts after it. Only the `kcp` table is touched: the
host's other nftables rules and /etc/nftables.conf are left alone.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

from kcp_host import systemd
from kcp_host.log import Abort, log

RULES = Path("/etc/kcp/firewall.nft")
NEW_RULES = RULES.with_suffix(".nft.new")
UNIT = "kcp-firewall.service"


def nft(*args: str) -> None:
    proc = subprocess.run(["nft", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Abort(1, f"nft {' '.join(args)}: {proc.stderr.strip()}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host firewall-apply", description=__doc__.splitlines()[0])
    parser.add_argument("--operators", required=True, help="the networks allowed to reach SSH, comma separated")
    args = parser.parse_args(argv)
    operators = [ipaddress.ip_network(cidr) for cidr in args.operators.split(",") if cidr]
    client = (os.environ.get("SSH_CONNECTION") or "").split()[:1]
    if client and not any(ipaddress.ip_address(client[0]) in net for net in operators):
        raise Abort(1, f"refusing the new firewall on {socket.gethostname()}: it allows SSH only from "
                       f"{args.operators or 'nowhere'}, and the program reaches this host from {client[0]}; applying "
                       "it would cut the program off this host and every host after it. Add that address (or its "
                       "network) to baremetal.operatorCidrs. Nothing was changed here or on the hosts after this one")
    if NEW_RULES.is_file():
        nft("-c", "-f", str(NEW_RULES))
        os.replace(NEW_RULES, RULES)
    nft("-f", str(RULES))
    systemd.act("daemon-reload")
    systemd.act("enable", UNIT)
    log(f"firewall loaded from {RULES}")
    return 0
