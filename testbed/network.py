"""The sandbox network: one bridge in the root namespace, one netns + veth per host.

Every name is derived deterministically from the sandbox and host names, so that
`down` can remove everything by name, even after a crash lost the state file.
Linux interface names are limited to 15 characters (IFNAMSIZ - 1); names are
validated up front instead of failing half-way through `ip link add`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from pathlib import Path

from testbed.system import run

IFNAME_MAX = 15
SANDBOX_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
PREFIX_RE = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")
#: The interface name inside every host namespace.
HOST_IFNAME = "eth0"


def validate_names(name: str, hosts: list[str]) -> None:
    """Reject names that would make invalid or colliding interface/netns names."""
    if not SANDBOX_NAME_RE.match(name):
        raise ValueError(f"sandbox name {name!r} must match {SANDBOX_NAME_RE.pattern}")
    veths: dict[str, str] = {}
    for host in hosts:
        if not HOST_NAME_RE.match(host):
            raise ValueError(f"host name {host!r} must match {HOST_NAME_RE.pattern}")
        veth = veth_name(name, host)
        if veth in veths:
            raise ValueError(f"hosts {veths[veth]!r} and {host!r} map to one veth {veth}")
        veths[veth] = host


def bridge_name(name: str) -> str:
    """`<name>br0`: at most 11 characters given the sandbox-name pattern."""
    return f"{name}br0"


def veth_name(name: str, host: str) -> str:
    """Root-side veth of a host: `<name>v<host>`, or a hash when that is too long."""
    plain = f"{name}v{host}"
    if len(plain) <= IFNAME_MAX:
        return plain
    digest = hashlib.sha256(host.encode()).hexdigest()
    return f"{name}v{digest[: IFNAME_MAX - len(name) - 1]}"


def netns_name(name: str, host: str) -> str:
    """`<name>-<host>`: netns names are files under /run/netns, not interfaces."""
    return f"{name}-{host}"


def subnet_network(prefix: str) -> ipaddress.IPv4Network:
    """The /24 for a prefix like `10.250.0`; must be a private range."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"subnet prefix {prefix!r} must look like 10.250.0")
    network = ipaddress.IPv4Network(f"{prefix}.0/24")
    if not network.is_private:
        raise ValueError(f"subnet {network} is not a private range")
    return network


def validate_addresses(prefix: str, hosts: dict[str, str]) -> None:
    """Each host address must be in the /24, unique, and not the bridge's .1."""
    network = subnet_network(prefix)
    bridge = gateway_address(prefix)
    seen: dict[str, str] = {}
    for host, address in hosts.items():
        ip = ipaddress.IPv4Address(address)
        if ip not in network or ip in (
            network.network_address,
            network.broadcast_address,
        ):
            raise ValueError(f"{host}={address} is not a host address of {network}")
        if address == bridge:
            raise ValueError(f"{host}={address} is the bridge's own address")
        if address in seen:
            raise ValueError(f"{seen[address]} and {host} share address {address}")
        seen[address] = host


def gateway_address(prefix: str) -> str:
    """The root namespace's address on the bridge (no host routes through it)."""
    return f"{prefix}.1"


def link_exists(ifname: str) -> bool:
    """True when a network interface of that name exists in the root namespace."""
    return Path("/sys/class/net", ifname).exists()


def netns_exists(ns: str) -> bool:
    """True when `ip netns` knows a namespace of that name."""
    return Path("/run/netns", ns).exists()


def ensure_bridge(bridge: str, prefix: str) -> None:
    """Create the bridge with `<prefix>.1/24`, refusing a subnet already used elsewhere."""
    _refuse_foreign_overlap(bridge, subnet_network(prefix))
    if not link_exists(bridge):
        run(["ip", "link", "add", bridge, "type", "bridge"])
    address = f"{gateway_address(prefix)}/24"
    if address not in _addresses(["ip", "-j", "addr", "show", "dev", bridge]):
        run(["ip", "addr", "add", address, "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def _refuse_foreign_overlap(bridge: str, network: ipaddress.IPv4Network) -> None:
    """The sandbox subnet must not be in use on any other interface of this machine."""
    listing = json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or b"[]")
    for link in listing:
        for info in link.get("addr_info", []):
            if link["ifname"] == bridge:
                continue
            if ipaddress.IPv4Address(info["local"]) in network:
                raise RuntimeError(f"{network} is already used on {link['ifname']}")


def _addresses(argv: list[str]) -> set[str]:
    """`address/prefixlen` strings from an `ip -j addr` listing."""
    listing = json.loads(run(argv).stdout or b"[]")
    return {f"{info['local']}/{info['prefixlen']}" for link in listing for info in link.get("addr_info", [])}


def ensure_host_link(ns: str, veth: str, bridge: str, address: str) -> None:
    """netns + veth pair (host side `eth0`), address and `lo` up; no default route."""
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    if not link_exists(veth):
        run(
            [
                "ip",
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IFNAME,
                "netns",
                ns,
            ]
        )
    run(["ip", "link", "set", veth, "master", bridge, "up"])
    cidr = f"{address}/24"
    if cidr not in _addresses(["ip", "-n", ns, "-j", "addr", "show", "dev", HOST_IFNAME]):
        run(["ip", "-n", ns, "addr", "add", cidr, "dev", HOST_IFNAME])
    run(["ip", "-n", ns, "link", "set", HOST_IFNAME, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def set_link(ifname: str, up: bool) -> None:
    """Raise or drop a root-side interface (a partition is the host's veth down)."""
    run(["ip", "link", "set", ifname, "up" if up else "down"])


def remove_host_link(ns: str, veth: str) -> None:
    """Delete the veth pair and the namespace; already-gone pieces are fine."""
    if link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    if netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)


def remove_bridge(bridge: str) -> None:
    """Delete the bridge by name if it is still there."""
    if link_exists(bridge):
        run(["ip", "link", "del", bridge], check=False)
