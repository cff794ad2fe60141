"""The clouds' side of `kcp-host cloud-boot`: `Gce` and `Aws`, method for method the same.

Metadata is read with urllib (a token goes only in a request header); the rest through the CLIs kcp-bootstrap used.
A secret a CLI prints stays in memory and is never logged."""

from __future__ import annotations

import glob
import ipaddress
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kcp_host.contract import BootEnv
from kcp_host.log import Abort, log

T = TypeVar("T")
# Metadata servers are link-local: never through a proxy. Nothing else here needs one (Cloud NAT, NAT gateways).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
GCE_METADATA = "http://metadata.google.internal/computeMetadata/v1"
GCS_API = "https://storage.googleapis.com"


class CloudError(Exception):
    """A cloud call failed or answered unexpectedly; the boot path tries it again (`retry`)."""


def retry(what: str, attempts: int, delay: float, step: Callable[[], T | None]) -> T:
    """The first answer of `step` that is not None (a CloudError is no answer yet); Abort after `attempts`."""
    for attempt in range(1, attempts + 1):
        try:
            answer = step()
            if answer is not None:
                return answer
        except CloudError as error:
            log(f"{what}: {error} (attempt {attempt} of {attempts})")
        if attempt < attempts:
            time.sleep(delay)
    raise Abort(1, f"cannot {what}")


def http(url: str, headers: dict[str, str], method: str = "GET", data: bytes | None = None,
         ok: Sequence[int] = (200,)) -> tuple[int, str]:
    """Status and body of one request; no answer, or a status not in `ok`, is a CloudError."""
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _DIRECT.open(request, timeout=10) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except OSError as error:
        raise CloudError(f"{method} {url}: {error}") from None
    if status not in ok:
        raise CloudError(f"{method} {url}: HTTP {status}")
    return status, body.decode()


def gce_token(metadata: str) -> str:
    """The instance service account's access token from the metadata server at `metadata` (for a request header)."""
    return str(json.loads(http(f"{metadata}/instance/service-accounts/default/token",
                               {"Metadata-Flavor": "Google"})[1])["access_token"])


def cli(*argv: str) -> str:
    """What a CLI prints (perhaps a secret: never in an error); a CloudError names its last error line."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        raise CloudError(f"{argv[0]} {argv[1]}: {lines[-1]}")
    return proc.stdout.strip()


def first_disk(*patterns: str) -> str:
    """The first block device matching the patterns, in order: a local SSD, blank after every replacement."""
    devices = [path for pattern in patterns for path in sorted(glob.glob(pattern)) if Path(path).is_block_device()]
    if not devices:
        raise Abort(1, f"no local disk found ({', '.join(patterns)})")
    return devices[0]


@dataclass
class Gce:
    """The marker object through the GCS JSON API, so that a missing object (404) is told apart from an error."""

    env: BootEnv
    metadata: str = GCE_METADATA
    storage: str = GCS_API

    def _metadata(self, path: str) -> str:
        return http(f"{self.metadata}/{path}", {"Metadata-Flavor": "Google"})[1]

    def _marker(self, url: str, ok: Sequence[int], method: str = "GET", data: bytes | None = None) -> bool:
        """Whether a GCS call on the marker object (named in `url` by {bucket} and {name}) answered 200."""
        token = gce_token(self.metadata)
        bucket, _, name = self.env.marker.removeprefix("gs://").partition("/")
        url = self.storage + url.format(bucket=bucket, name=urllib.parse.quote(name, safe=""))
        return http(url, {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}, method, data, ok)[0] == 200

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
        return first_disk("/dev/disk/by-id/google-local-nvme-ssd-0", "/dev/disk/by-id/google-local-ssd-0")

    def network(self, slot: str) -> list[str]:
        """The group gives the VM its reserved address; passthrough load balancers deliver to their own ones."""
        return list(self.env.lb_addresses)

    def marker_exists(self) -> bool:
        return self._marker("/storage/v1/b/{bucket}/o/{name}", (200, 404))

    def mark_formed(self) -> bool:
        """Create-only: 412 means another member created it first."""
        return self._marker("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}&ifGenerationMatch=0",
                            (200, 412), "POST", b"formed\n")


@dataclass
class Aws:
    """A member's EBS volume and interface carry its kcp-cluster and kcp-slot tags: the role attaches only those."""

    env: BootEnv
    imds: str = "http://169.254.169.254/latest"

    def _metadata(self, path: str) -> str:
        token = http(f"{self.imds}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, "PUT")[1]
        return http(f"{self.imds}/{path}", {"X-aws-ec2-metadata-token": token})[1]

    def _marker(self, command: str, *args: str, refused: Sequence[str]) -> bool:
        """Whether an s3api call on the marker object succeeded; False when its error says one of `refused`."""
        bucket, _, key = self.env.marker.removeprefix("s3://").partition("/")
        try:
            self._aws("s3api", command, "--bucket", bucket, "--key", key, *args)
        except CloudError as error:
            if any(word in str(error) for word in refused):
                return False
            raise
        return True

    def _aws(self, *args: str) -> str:
        return cli("aws", "--region", self.env.aws_region, *args)

    def _attached(self, what: str, slot: str, command: str, query: str, attach: list[str]) -> list[str]:
        """`query`'s fields (the last: its holder) once attached here; the group terminates the old holder first."""
        me = self._metadata("meta-data/instance-id")

        def mine() -> list[str] | None:
            *fields, held_by = self._aws("ec2", command, "--query", query, "--output", "text", "--filters",
                                         f"Name=tag:kcp-cluster,Values={self.env.cluster}",
                                         f"Name=tag:kcp-slot,Values={slot}").split()
            if not fields:  # the query found nothing: "None"
                raise Abort(1, f"no {what} tagged for slot {slot}")
            if held_by == me:
                return fields
            if held_by == "None":
                self._aws("ec2", *attach, fields[0], "--instance-id", me)
            else:
                log(f"{fields[0]} is still attached to {held_by}; waiting")
            return None

        return retry(f"attach the {what} of slot {slot}", 90, 10, mine)

    def slot(self) -> str:
        return self._metadata("meta-data/tags/instance/kcp-slot")

    def secret(self, name: str) -> str:
        return self._aws("secretsmanager", "get-secret-value", "--secret-id", name, "--query", "SecretString",
                         "--output", "text")

    def data_disk(self, slot: str) -> str:
        """persistent: the member's own EBS volume; local: the first instance-store disk."""
        if self.env.disk == "local":
            return first_disk("/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*")
        (volume,) = self._attached("EBS volume", slot, "describe-volumes",
                                   "Volumes[0].[VolumeId,Attachments[0].InstanceId]",
                                   ["attach-volume", "--device", "/dev/sdf", "--volume-id"])
        return f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume.replace('-', '', 1)}"

    def network(self, slot: str) -> list[str]:
        """etcd checks a peer's certificate against its source: traffic to the VPC leaves from the slot's interface."""
        if "etcd" not in self.env.roles:
            return []
        eni, address, mac = self._attached(
            "network interface", slot, "describe-network-interfaces",
            "NetworkInterfaces[0].[NetworkInterfaceId,PrivateIpAddress,MacAddress,Attachment.InstanceId]",
            ["attach-network-interface", "--device-index", "1", "--network-interface-id"])
        device = retry(f"see interface {eni} ({mac})", 60, 2, lambda: interface_with_mac(mac))
        subnet = self._metadata(f"meta-data/network/interfaces/macs/{mac}/subnet-ipv4-cidr-block")
        primary = self._metadata("meta-data/local-ipv4")
        primary_device = subprocess.run(["ip", "-o", "-4", "addr", "show", "to", primary], capture_output=True,
                                        text=True, check=True).stdout.split()[1]
        for argv in source_routes(device, address, subnet, primary, primary_device, self.env.vpc_cidr):
            subprocess.run(argv, check=argv[1:3] != ["rule", "del"], capture_output=True)  # may be absent
        return [primary]  # where the NLB sends (instance targets)

    def marker_exists(self) -> bool:
        return self._marker("head-object", refused=("(404)", "Not Found"))

    def mark_formed(self) -> bool:
        """Create-only, empty (only its existence counts): PreconditionFailed means another member created it."""
        return self._marker("put-object", "--if-none-match", "*", refused=("PreconditionFailed", "(412)"))


CLOUDS: dict[str, type[Gce | Aws]] = {"gce": Gce, "aws": Aws}


def interface_with_mac(mac: str, sys_net: str = "/sys/class/net") -> str | None:
    for address in sorted(Path(sys_net).glob("*/address")):
        if address.read_text().strip().lower() == mac.lower():
            return address.parent.name
    return None


def source_routes(device: str, address: str, subnet: str, primary: str, primary_device: str,
                  vpc_cidr: str) -> list[list[str]]:
    """To the VPC from the member address (table 101), replies from the primary one as before (table 100); converges."""
    gateway = str(ipaddress.ip_network(subnet)[1])
    return [
        ["ip", "link", "set", device, "up"],
        ["ip", "addr", "replace", f"{address}/{ipaddress.ip_network(subnet).prefixlen}", "dev", device],
        ["ip", "route", "replace", "default", "via", gateway, "dev", primary_device, "table", "100"],
        ["ip", "route", "replace", subnet, "dev", device, "src", address, "table", "101"],
        ["ip", "route", "replace", vpc_cidr, "via", gateway, "dev", device, "src", address, "table", "101"],
        ["ip", "rule", "del", "pref", "100"],
        ["ip", "rule", "del", "pref", "101"],
        ["ip", "rule", "add", "pref", "100", "from", primary, "lookup", "100"],
        ["ip", "rule", "add", "pref", "101", "lookup", "101"],
    ]
