"""The clouds' side of `kcp-host cloud-boot`: one class per cloud, method for method the same (`Cloud`).

Instance metadata is read with urllib, and a cloud token travels only in a request header, never on
a command line. The secret stores, EC2 and S3 are reached through the clouds' own CLIs: gcloud ships
on Google's images, the aws-cli snap is installed by kcp-bootstrap. A secret the CLI prints is kept
in memory and never logged.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from kcp_host.contract import BootEnv
from kcp_host.log import Abort, log

T = TypeVar("T")
# Metadata servers are link-local: never through a proxy. Nothing else here needs one (Cloud NAT, NAT gateways).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CloudError(Exception):
    """A cloud call failed or answered unexpectedly; the boot path tries it again (`retry`)."""


def retry(what: str, attempts: int, delay: float, step: Callable[[], T | None]) -> T:
    """The first answer of `step` that is not None (a CloudError is no answer yet); Abort after `attempts`."""
    for attempt in range(1, attempts + 1):
        try:
            answer = step()
        except CloudError as error:
            log(f"{what}: {error} (attempt {attempt} of {attempts})")
            answer = None
        if answer is not None:
            return answer
        if attempt < attempts:
            time.sleep(delay)
    raise Abort(1, f"cannot {what}")


def http(url: str, headers: dict[str, str], method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    """Status and body of one request: an HTTP error status is an answer, no answer is a CloudError."""
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _DIRECT.open(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:
        raise CloudError(f"{method} {url}: {error}") from None


def fetch(url: str, headers: dict[str, str], method: str = "GET") -> str:
    status, body = http(url, headers, method)
    if status != 200:
        raise CloudError(f"{method} {url}: HTTP {status}")
    return body.decode()


def cli(*argv: str) -> str:
    """What a CLI prints (perhaps a secret: never in an error); a CloudError names its last error line."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        raise CloudError(f"{argv[0]} {argv[1]}: {lines[-1]}")
    return proc.stdout.strip()


def require(program: str, hint: str) -> None:
    if shutil.which(program) is None:
        raise Abort(1, f"{program} is missing: {hint}")


def first_disk(patterns: Sequence[str]) -> str:
    """The first block device matching the patterns, in order: a local SSD, blank after every replacement."""
    for pattern in patterns:
        for device in sorted(glob.glob(pattern)):
            if Path(device).is_block_device():
                return device
    raise Abort(1, f"no local disk found ({', '.join(patterns)})")


class Cloud(Protocol):
    def prepare(self) -> None:
        """Check for what the methods below need."""

    def slot(self) -> str:
        """This machine's slot: the name of its secret bundle."""

    def secret(self, name: str) -> str:
        """One secret (a bundle) from the cloud's secret store."""

    def data_disk(self, slot: str) -> str:
        """Attach the etcd data disk if needed; its device."""

    def network(self, slot: str) -> list[str]:
        """Make the slot's stable address usable; the addresses that load balancers send to, where they differ."""

    def marker_exists(self) -> bool:
        """Whether the cluster-formed marker object exists (CloudError: cannot tell)."""

    def mark_formed(self) -> bool:
        """Create the marker object, create-only: True if this call created it, False if it existed."""


@dataclass
class Gce:
    """Identity and tokens from the metadata server, secrets from Secret Manager, the marker object through
    the GCS JSON API (so a missing object, 404, is told apart from an error)."""

    env: BootEnv
    metadata: str = "http://metadata.google.internal/computeMetadata/v1"
    storage: str = "https://storage.googleapis.com"

    def _metadata(self, path: str) -> str:
        return fetch(f"{self.metadata}/{path}", {"Metadata-Flavor": "Google"})

    def _auth(self) -> dict[str, str]:
        try:
            token = json.loads(self._metadata("instance/service-accounts/default/token"))["access_token"]
        except (ValueError, KeyError, TypeError):
            raise CloudError("the metadata server answered no access token") from None
        return {"Authorization": f"Bearer {token}"}

    def _marker(self) -> tuple[str, str]:
        bucket, _, name = self.env.marker.removeprefix("gs://").partition("/")
        return bucket, urllib.parse.quote(name, safe="")

    def prepare(self) -> None:
        require("gcloud", "use a Google-provided Debian or Ubuntu image")

    def slot(self) -> str:
        """Set per instance (etcd: its group's per-instance config) or per template (API servers)."""
        return self._metadata("instance/attributes/kcp-slot")

    def secret(self, name: str) -> str:
        return cli("gcloud", "secrets", "versions", "access", "latest", f"--secret={name}",
                   f"--project={self.env.gce_project}", "--quiet")

    def data_disk(self, slot: str) -> str:
        """persistent: the stateful disk the group re-attaches as etcd-data; local: the first local SSD."""
        if self.env.disk == "persistent":
            return "/dev/disk/by-id/google-etcd-data"
        return first_disk(("/dev/disk/by-id/google-local-nvme-ssd-0", "/dev/disk/by-id/google-local-ssd-0"))

    def network(self, slot: str) -> list[str]:
        """The group gives the VM its reserved address as its primary one: nothing to attach. Passthrough
        load balancers deliver to their own addresses."""
        return list(self.env.lb_addresses)

    def marker_exists(self) -> bool:
        bucket, name = self._marker()
        status, _ = http(f"{self.storage}/storage/v1/b/{bucket}/o/{name}", self._auth())
        if status not in (200, 404):
            raise CloudError(f"marker check answered HTTP {status}")
        return status == 200

    def mark_formed(self) -> bool:
        bucket, name = self._marker()
        url = f"{self.storage}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}&ifGenerationMatch=0"
        status, _ = http(url, {**self._auth(), "Content-Type": "text/plain"}, "POST", b"formed\n")
        if status not in (200, 412):  # 412: another member created it first
            raise CloudError(f"marker upload answered HTTP {status}")
        return status == 200


@dataclass
class Aws:
    """Identity from IMDSv2 (instance tags readable), secrets from Secrets Manager; the member's EBS volume
    and network interface are found by their kcp-cluster/kcp-slot tags and attached here (the instance
    role may attach only those)."""

    env: BootEnv
    imds: str = "http://169.254.169.254/latest"

    def _metadata(self, path: str) -> str:
        token = fetch(f"{self.imds}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, "PUT")
        return fetch(f"{self.imds}/{path}", {"X-aws-ec2-metadata-token": token})

    def _aws(self, *args: str) -> str:
        return cli("aws", "--region", self.env.aws_region, *args)

    def _by_slot(self, command: str, slot: str, query: str) -> list[str]:
        return self._aws("ec2", command, "--filters", f"Name=tag:kcp-cluster,Values={self.env.cluster}",
                         f"Name=tag:kcp-slot,Values={slot}", "--query", query, "--output", "text").split()

    def _attach(self, what: str, holder: list[str], attach: list[str]) -> None:
        """Attach once the previous (terminated) instance has let go; bounded, since the Auto Scaling group
        terminates the old instance first."""
        me = self._metadata("meta-data/instance-id")

        def attached() -> bool | None:
            held_by = self._aws("ec2", *holder, "--output", "text")
            if held_by == me:
                return True
            if held_by == "None":
                self._aws("ec2", *attach, "--instance-id", me)
            else:
                log(f"{what} is still attached to {held_by}; waiting")
            return None

        retry(f"attach {what}", 90, 10, attached)

    def _marker(self) -> list[str]:
        bucket, _, key = self.env.marker.removeprefix("s3://").partition("/")
        return ["--bucket", bucket, "--key", key]

    def prepare(self) -> None:
        require("aws", "kcp-bootstrap installs the aws-cli snap; use Canonical's Ubuntu image")

    def slot(self) -> str:
        return self._metadata("meta-data/tags/instance/kcp-slot")

    def secret(self, name: str) -> str:
        return self._aws("secretsmanager", "get-secret-value", "--secret-id", name, "--query", "SecretString",
                         "--output", "text")

    def data_disk(self, slot: str) -> str:
        """persistent: the member's own EBS volume (tagged with its slot); local: the first instance-store disk."""
        if self.env.disk == "local":
            return first_disk(("/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*",))
        volume = next(iter(self._by_slot("describe-volumes", slot, "Volumes[0].VolumeId")), "")
        if not volume.startswith("vol-"):
            raise Abort(1, f"no EBS volume tagged for slot {slot}")
        self._attach(volume, ["describe-volumes", "--volume-ids", volume, "--query", "Volumes[0].Attachments[0]."
                              "InstanceId"], ["attach-volume", "--volume-id", volume, "--device", "/dev/sdf"])
        return f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume.replace('-', '', 1)}"

    def network(self, slot: str) -> list[str]:
        """etcd members: attach the slot's interface (its fixed address is what certificates and peers name)
        and make it the source of traffic to the VPC, since etcd checks a peer's certificate against the
        connection's source address. The NLB sends to the primary address (instance targets)."""
        if "etcd" not in self.env.roles:
            return []
        found = self._by_slot("describe-network-interfaces", slot,
                              "NetworkInterfaces[0].[NetworkInterfaceId,PrivateIpAddress,MacAddress]")
        if len(found) != 3 or not found[0].startswith("eni-"):
            raise Abort(1, f"no network interface tagged for slot {slot}")
        eni, address, mac = found
        self._attach(eni, ["describe-network-interfaces", "--network-interface-ids", eni, "--query",
                           "NetworkInterfaces[0].Attachment.InstanceId"],
                     ["attach-network-interface", "--network-interface-id", eni, "--device-index", "1"])
        device = retry(f"see interface {eni} ({mac})", 60, 2, lambda: interface_with_mac(mac))
        subnet = self._metadata(f"meta-data/network/interfaces/macs/{mac}/subnet-ipv4-cidr-block")
        primary = self._metadata("meta-data/local-ipv4")
        for argv in source_routes(device, address, subnet, primary, interface_with_address(primary),
                                  self.env.vpc_cidr):
            subprocess.run(argv, check=argv[1:3] != ["rule", "del"], capture_output=True)  # may be absent
        return [primary]

    def marker_exists(self) -> bool:
        try:
            self._aws("s3api", "head-object", *self._marker())
        except CloudError as error:
            if "(404)" in str(error) or "Not Found" in str(error):
                return False
            raise
        return True

    def mark_formed(self) -> bool:
        with tempfile.NamedTemporaryFile("w", prefix="kcp-marker-") as body:  # the object's content, no secret
            body.write("formed\n")
            body.flush()
            try:
                self._aws("s3api", "put-object", *self._marker(), "--if-none-match", "*", "--body", body.name)
            except CloudError as error:
                if "PreconditionFailed" in str(error) or "(412)" in str(error):  # another member created it
                    return False
                raise
        return True


CLOUDS: dict[str, Callable[[BootEnv], Cloud]] = {"gce": Gce, "aws": Aws}


def interface_with_mac(mac: str, sys_net: str = "/sys/class/net") -> str | None:
    for address in sorted(Path(sys_net).glob("*/address")):
        if address.read_text().strip().lower() == mac.lower():
            return address.parent.name
    return None


def interface_with_address(address: str) -> str:
    links = json.loads(subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    found = [link["ifname"] for link in links for a in link.get("addr_info", []) if a.get("local") == address]
    if not found:
        raise Abort(1, f"no interface has the primary address {address}")
    return str(found[0])


def source_routes(device: str, address: str, subnet: str, primary: str, primary_device: str,
                  vpc_cidr: str) -> list[list[str]]:
    """`ip` commands: the member address on its interface, traffic to the VPC leaves from it (table 101),
    replies from the primary address keep leaving by the primary interface (table 100). Replaces, so
    every boot converges."""
    net = ipaddress.ip_network(subnet)
    gateway = str(net[1])
    return [
        ["ip", "link", "set", device, "up"],
        ["ip", "addr", "replace", f"{address}/{net.prefixlen}", "dev", device],
        ["ip", "route", "replace", "default", "via", gateway, "dev", primary_device, "table", "100"],
        ["ip", "route", "replace", subnet, "dev", device, "src", address, "table", "101"],
        ["ip", "route", "replace", vpc_cidr, "via", gateway, "dev", device, "src", address, "table", "101"],
        ["ip", "rule", "del", "pref", "100"],
        ["ip", "rule", "del", "pref", "101"],
        ["ip", "rule", "add", "pref", "100", "from", primary, "lookup", "100"],
        ["ip", "rule", "add", "pref", "101", "lookup", "101"],
    ]
