"""Where the members and the backups are: the stack file, through the one stack file reader, overridden
by flags (tests and other targets point a restore anywhere)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from components.config import BackupHost, BareMetal, ClusterConfig
from components.restore import RestoreError
from components.restore.deltas import Replayed, until_argument
from components.restore.members import Host
from components.restore.sources import (
    BackupFolder,
    DeltaLog,
    GcsBackups,
    LocalFile,
    LocalFileWithDeltas,
    S3Backups,
    Source,
)
from components.restore.ssh import Ssh
from components.stack_file import StackFileError, read_stack

STACKS = Path(__file__).resolve().parents[2] / "stacks"
# Without a stack file, the config model's defaults still apply.
DEFAULT_USER: str = BareMetal.model_fields["user"].default
DEFAULT_BACKUP_PATH: str = BackupHost.model_fields["path"].default


# How far a restore moves etcd's revision past the snapshot's (etcdutl --bump-revision, with --mark-compacted):
# further than any cluster writes between its last backup and its loss, so a revision a client saw before is never
# handed out again for other data; watchers and informers resuming from one get "compacted" and list anew
# (kubernetes#118501). The figure Kubernetes' own restore guide uses; docs/backups.md.
DEFAULT_REVISION_BUMP = 1_000_000_000


@dataclass
class Plan:
    hosts: list[Host]
    ssh: Ssh
    source: Source
    spares: list[Host] = field(default_factory=list)  # retired after the restore: a takeover belongs to the old cluster
    revision_bump: int = DEFAULT_REVISION_BUMP
    deltas: Replayed | None = None  # `source` and its delta log, replayed on the first host; None: the snapshot alone
    # The restored cluster replaces the one whose backups these are, so its delta log starts anew (False: a drill,
    # whose scratch cluster leaves the live cluster's delta log alone).
    new_history: bool = True

    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]

    @property
    def reader(self) -> Source:
        """What the restore picks from and reads: the delta log's replay when there is one, else the snapshots."""
        return self.deltas or self.source


def stack_path(stack: str) -> Path:
    """`local` -> stacks/Pulumi.local.yaml; a path is taken as is."""
    candidate = Path(stack)
    return candidate if candidate.suffix in (".yaml", ".yml") else STACKS / f"Pulumi.{stack}.yaml"


def parse_hosts(text: str) -> list[Host]:
    """`h1=10.0.0.1,h2=10.0.0.2` (or bare addresses, named by themselves)."""
    hosts = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, address = item.partition("=")
        hosts.append(Host(name, address) if sep else Host(item, item))
    return hosts


def source_of(args: argparse.Namespace, cfg: ClusterConfig | None, ssh: Ssh) -> Source:
    """A bucket, a local file, or (by default) the cluster's folder on the backup host."""
    if args.delta_dir and not args.snapshot_file:
        raise RestoreError("--delta-dir goes with --snapshot-file (the backup host's folder and --bucket hold "
                           "their own delta log)")
    if args.bucket:
        return GcsBackups(args.bucket) if args.bucket.startswith(GcsBackups.SCHEME) else S3Backups(args.bucket)
    if args.snapshot_file:
        if args.delta_dir:
            return LocalFileWithDeltas(args.snapshot_file, args.metadata, args.delta_dir)
        return LocalFile(args.snapshot_file, args.metadata)
    backup = cfg.baremetal.backup_host if cfg and cfg.baremetal else None
    cluster = args.cluster_name or (cfg.cluster_name if cfg else None)
    root = backup.path if backup else DEFAULT_BACKUP_PATH
    # Listing and reading log in as the SSH user (root, or sudo -n), unless --backup-user: the
    # stack's backupHost.user is the receiver's forced-command user, which can only add files.
    return BackupFolder(ssh, address=args.backup_host or (backup.address if backup else None),
                        directory=args.backup_path or (f"{root.rstrip('/')}/{cluster}" if cluster else None),
                        user=args.backup_user, delta_dir=args.delta_log)


def build_plan(args: argparse.Namespace) -> Plan:
    """Stack values first, flags win."""
    try:
        cfg = read_stack(stack_path(args.stack)) if args.stack else None
    except StackFileError as error:
        raise RestoreError(str(error)) from None
    bm = cfg.baremetal if cfg else None
    hosts = [Host(h.name, h.address) for h in bm.hosts if "etcd" in h.roles] if bm else []
    spares = [Host(s.name, s.address) for s in bm.spares] if bm else []
    if args.hosts:
        hosts, spares = parse_hosts(args.hosts), parse_hosts(args.spares or "")
    if not hosts:
        raise RestoreError("no etcd hosts: give --stack with baremetal.hosts or --hosts")
    # The stack's pinned host keys, by address: they also hold for --hosts and --backup-host at those addresses.
    pinned = {h.address: h.host_key for h in (*bm.hosts, *bm.spares, bm.backup_host) if h.host_key} if bm else {}
    ssh = Ssh(user=args.ssh_user or (bm.user if bm else DEFAULT_USER),
              key=args.ssh_key or (bm.ssh_private_key_path if bm else None), options=args.ssh_option,
              host_keys=pinned)
    source = source_of(args, cfg, ssh)
    deltas = None
    if isinstance(source, DeltaLog) and not args.no_deltas:
        deltas = Replayed(source, ssh, hosts[0], args.until)
    elif args.until is not None:
        raise RestoreError("--until needs the delta log: "
                           + ("leave out --no-deltas" if args.no_deltas else "with --snapshot-file, give --delta-dir"))
    return Plan(hosts, ssh, source, spares, args.bump_revision, deltas)


def parser(description: str | None) -> argparse.ArgumentParser:
    """Flags shared by scripts/etcd-restore and scripts/dr-drill."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", help="stack name (stacks/Pulumi.<stack>.yaml) or path to a stack file")
    p.add_argument("--hosts", help="etcd members as name=address,... (overrides the stack)")
    p.add_argument("--spares", help="with --hosts: the spares, name=address,... (default with --hosts: none)")
    p.add_argument("--ssh-user", help="login user on members and backup host (default: baremetal.user or root)")
    p.add_argument("--ssh-key", help="private key file (default: baremetal.sshPrivateKeyPath)")
    p.add_argument("--ssh-option", action="append", default=[],
                   help="extra ssh -o option, repeatable, first (it wins). Default host key checking: strict, "
                   "against the stack's hostKey where it pins the address, else against your known_hosts")
    p.add_argument("--backup-host", help="backup host address (default: baremetal.backupHost.address)")
    p.add_argument("--backup-path", help="the cluster's folder on it (default: backupHost.path/clusterName)")
    p.add_argument("--backup-user", help="login user on the backup host (default: --ssh-user)")
    p.add_argument("--cluster-name", help="default: clusterName from the stack")
    p.add_argument("--snapshot", help="snapshot name (default: the newest verified one; with --until, the newest "
                   "verified one at or before it). The delta log's revisions after it are replayed onto it")
    p.add_argument("--until", type=until_argument, metavar="TIME|REVISION",
                   help="restore the cluster as it was at this revision, or at this time (ISO 8601 UTC, e.g. "
                   "2026-12-01T06:30:00Z: the last revision archived at or before it), from a snapshot and the "
                   "delta log (default: the newest archived revision)")
    p.add_argument("--no-deltas", action="store_true",
                   help="restore the snapshot alone, without replaying the delta log after it")
    p.add_argument("--bucket", help="restore from this bucket backupLocation (s3://BUCKET/PREFIX or "
                   "gs://BUCKET/PREFIX, `pulumi stack output backupLocation`) with the operator's aws or gcloud CLI "
                   "and credentials")
    p.add_argument("--snapshot-file", type=Path, help="restore this local file (e.g. downloaded from a bucket)")
    p.add_argument("--metadata", type=Path, help="the snapshot's .json, needed with --snapshot-file")
    p.add_argument("--delta-dir", type=Path, help="with --snapshot-file: a folder of the delta log's chunks after it "
                   "(a bucket's deltas/<cluster ID>/, downloaded), replayed onto it")
    p.add_argument("--bump-revision", type=revision_bump, default=DEFAULT_REVISION_BUMP, metavar="N",
                   help="move the restored revision N past the snapshot's and mark it compacted (default: "
                   "%(default)s; 0: keep the snapshot's revision, for etcd older than 3.5.13)")
    p.add_argument("--delta-log", type=delta_log, default="deltas", metavar="DIR",
                   help="the delta log in the cluster's folder (default: %(default)s, the live one); an earlier one a "
                   "restore set aside, deltas.before-restore-TOKEN, restores a point of the history before it")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return p


def delta_log(text: str) -> str:
    if not re.fullmatch(r"deltas(\.before-restore-[0-9a-f]{1,32})?", text):
        raise argparse.ArgumentTypeError(f"'{text}' is no delta log: deltas, or deltas.before-restore-TOKEN")
    return text


def revision_bump(text: str) -> int:
    if not text.isdigit() or int(text) >= 1 << 62:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of revisions from 0 to 2^62")
    return int(text)
