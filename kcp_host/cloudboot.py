"""cloud-boot: the boot path of GCE and AWS control-plane machines, at every boot.

kcp-boot.service runs kcp-bootstrap, which unpacks the agent and hands over to this. Settings come
from /etc/kcp/boot.env (`BootEnv`), secrets from the slot's bundle in the cloud's secret store; the
clouds differ only in kcp_host/clouds.py. Every step checks or overwrites, so a reboot or a re-run
converges; what a reboot loses (attachments, mounts, routes, forwarding) is redone.
"""

from __future__ import annotations

import argparse
import base64
import grp
import gzip
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from kcp_host import install, systemd
from kcp_host.clouds import CLOUDS, Cloud, CloudError, retry
from kcp_host.contract import BootEnv, ClusterEnv, load_env
from kcp_host.etcd import Etcdctl
from kcp_host.files import write_atomic
from kcp_host.lifecycle import await_healthy
from kcp_host.log import Abort, log

ETCD_MOUNT = "/var/lib/etcd"
FSTAB = "/etc/fstab"
DATA_DISK_DROPIN = "/etc/systemd/system/etcd.service.d/10-data-disk.conf"
BACKUP_TIMER = "etcd-backup.timer"
FORWARD_TABLE = "kcp_forward"


def unpack(text: str, root: str = "/") -> list[Path]:
    """Write a bundle (components/render/hostfiles.py `bundle`: base64 of a tar.gz) under `root`, from
    memory: regular files only, modes kept, owners by name. Every entry is checked before the first is
    written, so a bad bundle changes nothing."""
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(text.strip(), validate=True)))) as tar:
            entries = [(m, _read(tar, m)) for m in tar.getmembers()]
    except (ValueError, OSError, EOFError, zlib.error, tarfile.TarError) as error:
        raise CloudError(f"not a bundle: {error}") from None
    targets = [bundle_target(Path(root), member) for member, _ in entries]
    for (member, data), target in zip(entries, targets, strict=True):
        write_atomic(target, data, member.mode & 0o7777, (member.uname, member.gname))
    return targets


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member) if member.isreg() else None
    return source.read() if source else b""


def bundle_target(root: Path, member: tarfile.TarInfo) -> Path:
    """Where an entry goes; Abort for what a bundle never holds: links, devices, folders, names that leave
    `root`, owners this host does not have."""
    name = PurePosixPath(member.name)
    if not member.isreg():
        raise Abort(1, f"bundle entry {member.name}: not a regular file")
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise Abort(1, f"bundle entry {member.name}: not a path under {root}")
    try:
        pwd.getpwnam(member.uname)
        grp.getgrnam(member.gname)
    except KeyError:
        raise Abort(1, f"bundle entry {member.name}: no user or group {member.uname}:{member.gname} here") from None
    return root / name


def fstab_with_mount(fstab: str, uuid: str) -> str:
    """fstab with the data disk's line (by UUID: device names change between boots) replacing an older one."""
    kept = [line for line in fstab.splitlines() if f" {ETCD_MOUNT} ext4 " not in line]
    return "\n".join([*kept, f"UUID={uuid} {ETCD_MOUNT} ext4 defaults,nofail,noatime 0 2"]) + "\n"


def mount_data_disk(device: str) -> None:
    """Format only a disk that carries no filesystem at all; mount it on /var/lib/etcd through fstab, so a
    reboot mounts it before etcd starts. etcd never starts on the bare mount point: that would look like a
    lost member."""
    retry(f"see the etcd data disk {device}", 60, 2, lambda: Path(device).is_block_device() or None)
    probe = subprocess.run(["blkid", "-p", device], capture_output=True, check=False).returncode
    if probe == 2:  # no signature of any kind
        log(f"formatting the blank data disk {device}")
        subprocess.run(["mkfs.ext4", "-q", "-L", "etcd-data", device], check=True)
    elif probe != 0:
        raise Abort(1, f"cannot probe {device} (blkid exit {probe})")
    uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", device], capture_output=True, text=True,
                          check=True).stdout.strip()
    write_atomic(FSTAB, fstab_with_mount(Path(FSTAB).read_text(), uuid))
    Path(ETCD_MOUNT).mkdir(mode=0o700, exist_ok=True)
    systemd.systemctl("daemon-reload", check=True)
    if not os.path.ismount(ETCD_MOUNT):
        subprocess.run(["mount", ETCD_MOUNT], check=True)
    shutil.chown(ETCD_MOUNT, "etcd", "etcd")
    os.chmod(ETCD_MOUNT, 0o700)
    write_atomic(DATA_DISK_DROPIN, f"[Unit]\nRequiresMountsFor={ETCD_MOUNT}\n")


def forward_rules(to: str, sources: Sequence[str], ports: Sequence[str]) -> str:
    """nft's input replacing the table at once: the ports of every address a load balancer delivers to
    (it keeps the packet's destination) are DNAT'ed to the address etcd and the API server listen on."""
    rule = f"ip daddr {{ {', '.join(sources)} }} tcp dport {{ {', '.join(ports)} }} dnat to {to};"
    return (f"table ip {FORWARD_TABLE}\ndelete table ip {FORWARD_TABLE}\n"
            f"table ip {FORWARD_TABLE} {{\n"
            f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; {rule} }}\n"
            f"  chain output {{ type nat hook output priority -100; policy accept; {rule} }}\n"
            "}\n")


def forward(to: str, sources: Sequence[str], ports: Sequence[str]) -> None:
    if not sources or not ports:
        return
    if shutil.which("nft") is None:
        install.apt_install("nftables")
    subprocess.run(["nft", "-f", "-"], input=forward_rules(to, sources, ports), text=True, check=True)


def listen_address(env: BootEnv) -> str:
    """Where etcd (its member address, from the slot's cluster.env) or the API server listens."""
    if "etcd" in env.roles:
        return urlsplit(load_env(ClusterEnv).client_url).hostname or ""
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]


def start_etcd(cloud: Cloud, wait_seconds: int) -> None:
    """A replacement with an empty disk must rejoin (runtime reconfiguration) or refuse, never bootstrap a
    second cluster: the marker object tells etcd-member-recovery that the cluster exists."""
    cluster = load_env(ClusterEnv)
    formed = Path(cluster.cluster_formed_file)
    if retry("tell whether the cluster has formed", 30, 10, cloud.marker_exists):
        formed.touch()
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("enable", cluster.etcd_unit, BACKUP_TIMER, check=True)
    systemd.systemctl("start", "--no-block", cluster.etcd_unit, check=True)
    systemd.systemctl("start", BACKUP_TIMER, check=True)
    await_healthy(cluster, Etcdctl.of(cluster), wait_seconds)
    created = retry("write the cluster-formed marker", 10, 6, cloud.mark_formed)
    formed.touch()
    log(f"etcd member healthy; the cluster marker {'written' if created else 'was there'}")


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kcp-host cloud-boot", description=__doc__.splitlines()[0]).parse_args(argv)
    env = load_env(BootEnv)
    if env.provider not in CLOUDS:
        raise Abort(2, f"unknown provider {env.provider!r} (one of {', '.join(CLOUDS)})")
    cloud = CLOUDS[env.provider](env)
    cloud.prepare()
    slot = retry("read this machine's slot", 30, 5, cloud.slot)
    log(f"slot {slot}, roles: {' '.join(env.roles)}")
    if "etcd" in env.roles:
        install.etcd(list(env.etcd_install))  # creates the etcd user that the bundle's files belong to
        mount_data_disk(retry("find the etcd data disk", 10, 6, lambda: cloud.data_disk(slot)))
    retry(f"read and unpack the bundle {slot}", 30, 10, lambda: unpack(cloud.secret(slot)))
    sources = retry("set up this machine's addresses", 10, 6, lambda: cloud.network(slot))
    forward(listen_address(env), sources, env.forward_ports)
    if "apiserver" in env.roles:
        install.kubelet(list(env.kubelet_install))
    if "etcd" in env.roles:
        start_etcd(cloud, env.wait_seconds)
    log("done")
    return 0
