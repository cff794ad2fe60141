"""cloud-boot: the boot path of GCE and AWS control-plane machines, at every boot, after kcp-bootstrap.

Settings come from boot.env, secrets in the slot's bundle; the clouds differ only in kcp_host/clouds.py. Every step
checks or overwrites, so a reboot (which loses attachments, mounts, routes and forwarding) or a re-run converges."""

from __future__ import annotations

import argparse
import base64
import grp
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from kcp_host import install, systemd
from kcp_host.clouds import CLOUDS, Aws, CloudError, Gce, retry
from kcp_host.contract import (
    DELTA_UNIT,
    DELTA_UNIT_FILE,
    MEMBERSHIP_TIMER_FILE,
    SLOT_FILES,
    BackupEnv,
    BootEnv,
    ClusterEnv,
    SlotEnv,
    load_env,
)
from kcp_host.etcd import Etcdctl
from kcp_host.files import write_atomic
from kcp_host.lifecycle import await_healthy
from kcp_host.log import Abort, log

ETCD_MOUNT = "/var/lib/etcd"
RESTART_SECONDS = 30  # how often boot starts again an etcd that stays stopped as no member


def read_bundle(text: str, root: str = "/") -> list[tuple[Path, tarfile.TarInfo, bytes]]:
    """A bundle's files (hostfiles.bundle) from memory: where each goes under `root`, its entry and its bytes, every
    entry checked before the first is read."""
    try:
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(text.strip(), validate=True))) as tar:
            # bundle_target refuses an entry before it is read: extractfile would follow a link
            entries = [(bundle_target(Path(root), m), m, tar.extractfile(m)) for m in tar.getmembers()]
            return [(target, member, source.read()) for target, member, source in entries if source]
    except (ValueError, OSError, EOFError, zlib.error, tarfile.TarError) as error:
        raise CloudError(f"not a bundle: {error}") from None


def unpack(text: str, root: str = "/") -> list[Path]:
    """A bundle written under `root`. Returns the files it changed: one already in place (bytes, mode, owner) is
    left alone, so a refresh knows."""
    changed = [(target, member, data) for target, member, data in read_bundle(text, root)
               if not in_place(target, member, data)]
    for target, member, data in changed:
        write_atomic(target, data, member.mode & 0o7777, (member.uname, member.gname))
    return [target for target, _, _ in changed]


def unpack_slot(text: str, root: str = "/") -> list[Path]:
    """The slot's bundle unpacked, and what an earlier one placed that this one lacks removed (a unit stopped and
    disabled first): a setting turned off on a cloud is off (`backup.deltaSeconds` drops the delta log's unit).
    Returns the files it changed or removed."""
    record = Path(root, SLOT_FILES.lstrip("/"))
    placed = {str(target) for target, _, _ in read_bundle(text, root)}
    before = set(record.read_text().splitlines()) if record.is_file() else set()
    gone = [Path(path) for path in sorted(before - placed) if os.path.lexists(path)]
    for path in gone:
        if path.suffix in (".service", ".timer") and path.parent.name == "system":
            systemd.act("disable", "--now", path.name)
        path.unlink()
        log(f"removed {path}: the slot's bundle no longer has it")
    changed = unpack(text, root=root)
    write_atomic(record, "".join(f"{path}\n" for path in sorted(placed)))
    return changed + gone


def in_place(target: Path, member: tarfile.TarInfo, data: bytes) -> bool:
    """Whether the file is there as the bundle has it: bytes, mode and owner."""
    try:
        return (target.stat().st_mode & 0o7777 == member.mode & 0o7777 and target.read_bytes() == data
                and (target.owner(), target.group()) == (member.uname, member.gname))
    except (OSError, KeyError):  # absent, or owned by an id without a name
        return False


def bundle_target(root: Path, member: tarfile.TarInfo) -> Path:
    """Where an entry goes; Abort for what a bundle never holds, since a secret store's text is not trusted blindly."""
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
    """Format only a blank disk; fstab mounts it at boot and etcd requires it: a bare mount point looks like a loss."""
    retry(f"see the etcd data disk {device}", 60, 2, lambda: Path(device).is_block_device() or None)
    probe = subprocess.run(["blkid", "-p", device], capture_output=True, check=False).returncode
    if probe == 2:  # no signature of any kind
        log(f"formatting the blank data disk {device}")
        subprocess.run(["mkfs.ext4", "-q", "-L", "etcd-data", device], check=True)
    elif probe != 0:
        raise Abort(1, f"cannot probe {device} (blkid exit {probe})")
    uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", device], capture_output=True, text=True,
                          check=True).stdout.strip()
    write_atomic("/etc/fstab", fstab_with_mount(Path("/etc/fstab").read_text(), uuid))
    systemd.act("daemon-reload")  # systemd's unit of the fstab line: starting it mounts the disk unless it is
    systemd.act("start", "var-lib-etcd.mount")
    shutil.chown(ETCD_MOUNT, "etcd", "etcd")
    os.chmod(ETCD_MOUNT, 0o700)
    write_atomic("/etc/systemd/system/etcd.service.d/10-data-disk.conf", f"[Unit]\nRequiresMountsFor={ETCD_MOUNT}\n")


def forward_rules(to: str, sources: Sequence[str], ports: Sequence[str]) -> str:
    """nft's input replacing the table at once: load balancers keep the packet's destination, so DNAT it."""
    rule = f"ip daddr {{ {', '.join(sources)} }} tcp dport {{ {', '.join(ports)} }} dnat to {to};"
    return ("table ip kcp_forward\ndelete table ip kcp_forward\n"
            "table ip kcp_forward {\n"
            f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; {rule} }}\n"
            f"  chain output {{ type nat hook output priority -100; policy accept; {rule} }}\n"
            "}\n")


def forward(to: str, sources: Sequence[str], ports: Sequence[str]) -> None:
    if not sources or not ports:
        return
    if shutil.which("nft") is None:
        install.apt_install("nftables")
    subprocess.run(["nft", "-f", "-"], input=forward_rules(to, sources, ports), text=True, check=True)


def node_address() -> str:
    """The machine's primary address: where its API server listens (a host-network pod's address)."""
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]


def cloud_of(env: BootEnv) -> Gce | Aws:
    if env.provider not in CLOUDS:
        raise Abort(2, f"unknown provider {env.provider!r} (one of {', '.join(CLOUDS)})")
    return CLOUDS[env.provider](env)


def start_delta_log(changed: Sequence[Path] = ()) -> None:
    """The delta log's archiver, where the bundle has its unit (backup.deltaSeconds). It reads cluster.env and
    backup.env once, as it starts, so it restarts when `changed` (what a refresh unpacked) holds one of them or its
    unit. Nothing else needs it: a new agent build restarted it before (restart-agent-services), and an etcd restart
    only ends its watch, which it resumes."""
    unit = Path(DELTA_UNIT_FILE)
    if unit.is_file():
        reads = (ClusterEnv.PATH, BackupEnv.PATH, unit.as_posix())
        restart = any(path.as_posix().endswith(read) for path in changed for read in reads)  # under unpack's root
        systemd.act("enable", DELTA_UNIT)
        systemd.act("restart" if restart else "start", "--no-block", DELTA_UNIT)


def start_membership_watch() -> None:
    """Where the slot's bundle has it (a cloud etcd member's): the watch for members a shrink deleted."""
    if Path(MEMBERSHIP_TIMER_FILE).is_file():
        systemd.act("enable", "--now", Path(MEMBERSHIP_TIMER_FILE).name)


def await_member(cluster: ClusterEnv, wait_seconds: float) -> None:
    """Until every member is healthy. A slot the stack dropped and then added again finds its old member marked
    removed until a staying member's refresh clears the mark (its new bundle lists the slot again); meanwhile
    etcd-member-recovery keeps etcd stopped as no member, so it is started again every RESTART_SECONDS rather than
    left stopped until the group replaces the machine."""
    ctl, deadline = Etcdctl.of(cluster), time.monotonic() + wait_seconds
    while True:
        try:
            return await_healthy(cluster, ctl, max(min(RESTART_SECONDS, deadline - time.monotonic()), 1))
        except Abort:
            stopped = Path(cluster.not_a_member_file)
            if time.monotonic() >= deadline:
                raise
            if stopped.is_file():
                log(f"etcd stays stopped ({stopped.read_text().strip()}): starting it again")
                systemd.act("start", "--no-block", cluster.etcd_unit)


def start_etcd(cloud: Gce | Aws, wait_seconds: int) -> None:
    """The marker object tells etcd-member-recovery that the cluster exists: a blank replacement never bootstraps."""
    cluster = load_env(ClusterEnv)
    formed = Path(cluster.cluster_formed_file)
    if retry("tell whether the cluster has formed", 30, 10, cloud.marker_exists):
        formed.touch()
    systemd.act("daemon-reload")
    systemd.act("enable", cluster.etcd_unit, "etcd-backup.timer")
    systemd.act("start", "--no-block", cluster.etcd_unit)
    systemd.act("start", "etcd-backup.timer")
    start_delta_log()
    await_member(cluster, wait_seconds)
    created = retry("write the cluster-formed marker", 10, 6, cloud.mark_formed)
    formed.touch()
    start_membership_watch()
    log(f"etcd member healthy; the cluster marker {'written' if created else 'was there'}")


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kcp-host cloud-boot", description=__doc__.splitlines()[0]).parse_args(argv)
    env = load_env(BootEnv)
    cloud = cloud_of(env)
    slot = retry("read this machine's slot", 30, 5, cloud.slot)
    log(f"slot {slot}, roles: {' '.join(env.roles)}")
    if "etcd" in env.roles:
        install.ensure_etcd_user()  # the member bundle's files belong to it
        mount_data_disk(retry("find the etcd data disk", 10, 6, lambda: cloud.data_disk(slot)))
    # The slot's files (an API server's units and kubelet config too, slot.env's releases) before anything starts.
    retry(f"read and unpack the bundle {slot}", 30, 10, lambda: unpack_slot(cloud.secret(slot)))
    releases = load_env(SlotEnv)
    install.etcd(list(releases.etcd_install))  # API servers too: their etcdctl takes the rollout lock
    sources = retry("set up this machine's addresses", 10, 6, lambda: cloud.network(slot))
    # etcd: the member address, from the bundle's cluster.env
    address = (urlsplit(load_env(ClusterEnv).client_url).hostname or "") if "etcd" in env.roles else node_address()
    forward(address, sources, env.forward_ports)
    if "apiserver" in env.roles:
        install.kubelet(list(releases.kubelet_install))
    if "etcd" in env.roles:
        start_etcd(cloud, env.wait_seconds)
    log("done")
    return 0
