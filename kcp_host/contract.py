"""The contract between the program and its hosts, defined once.

Every file and variable that the renderer writes for the host agent is declared here with
its type, its default and what it means. The renderer writes env files through
`render_env`, the agent reads them through `load_env`, the unit tests build host layouts
with both, and the tables of docs/host-layout.md are generated from here
(`python -m kcp_host.contract --check|--write`). A default lives in this file only.
Standard library only: the same module runs on every host.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

LIB = "/usr/local/lib/kcp"
AGENT = f"{LIB}/kcp-host"
ETCD_DIR = "/etc/etcd"
PKI = f"{ETCD_DIR}/pki"
ETCD_ENV = f"{ETCD_DIR}/etcd.env"
BACKUP_SSH_KEY = f"{ETCD_DIR}/backup-ssh/id_ed25519"
BACKUP_SSH_KNOWN_HOSTS = f"{ETCD_DIR}/backup-ssh/known_hosts"
DELTA_UNIT = "etcd-delta-archive.service"  # the delta log's archiver, where backup.deltaSeconds renders it
DELTA_UNIT_FILE = f"/etc/systemd/system/{DELTA_UNIT}"
METRICS_HTTP_UNIT = "kcp-metrics-http.service"  # serves the metrics file on every etcd host
# The agent's long-running services: each keeps the build it started with, so a new build restarts those that run.
AGENT_SERVICES = (DELTA_UNIT, METRICS_HTTP_UNIT)
MEMBERSHIP_WATCH = "kcp-cloud-membership"  # a cloud member's watch for voters a shrink deleted: .service, .timer
MEMBERSHIP_TIMER_FILE = f"/etc/systemd/system/{MEMBERSHIP_WATCH}.timer"
MEMBERSHIP_WATCH_SECONDS = 30
HOST_IDENTITY = "/etc/kcp/host-identity"
DATA_DIR = "/var/lib/etcd/data"
REFRESH_APPLIED = "/var/lib/kcp/cloud-refresh.sha256"
SLOT_FILES = "/var/lib/kcp/slot-bundle.files"
STATIC_PODS_STARTED = "/run/kcp/static-pods-started"


class ContractError(Exception):
    """A host file that does not satisfy the contract (missing, unreadable, a bad value)."""


def setting(doc: str, default: Any = dataclasses.MISSING, example: str = "") -> Any:
    """A variable of an env file: required when it has no default."""
    return field(default=default, metadata={"doc": doc, "example": example})


@dataclass(frozen=True)
class EnvFile:
    """Base of the env files below: where the file lives and how its variables are named."""

    PATH: ClassVar[str]
    PREFIX: ClassVar[str]
    OVERRIDE: ClassVar[str]  # an environment variable naming another file (tests, manual runs)
    DOC: ClassVar[str]


@dataclass(frozen=True)
class ClusterEnv(EnvFile):
    PATH: ClassVar[str] = f"{ETCD_DIR}/cluster.env"
    PREFIX: ClassVar[str] = "KCP_"
    OVERRIDE: ClassVar[str] = "KCP_CLUSTER_ENV"
    DOC: ClassVar[str] = "what every etcd host (member or spare) knows of its cluster"

    cluster_name: str = setting("the cluster's name", example="local")
    member_name: str = setting("this host's member name", example="h1")
    peer_url: str = setting("this member's peer URL", example="https://10.250.0.11:2380")
    client_url: str = setting("this member's client URL", example="https://10.250.0.11:2379")
    members: tuple[str, ...] = setting(
        "the configured members as etcd's initial cluster (`name=peer URL`, comma separated)",
        example="h1=https://10.250.0.11:2380,h2=...")
    client_endpoints: tuple[str, ...] = setting("the configured members' client URLs, comma separated",
                                                example="https://10.250.0.11:2379,...")
    etcd_ca: str = setting("etcd CA", example=f"{PKI}/ca.crt")
    etcd_cert: str = setting("this member's serving certificate, also its client certificate",
                             example=f"{PKI}/server.crt")
    etcd_key: str = setting("its key", example=f"{PKI}/server.key")
    data_dir: str = setting("etcd's data dir", example=DATA_DIR)
    join_env: str = setting("written when this host joins an existing cluster (read by etcd.service)",
                            "/run/etcd/join.env")
    cluster_formed_file: str = setting("present once the cluster formed: an empty data dir then means "
                                       "\"replace me\", never \"bootstrap\"", f"{ETCD_DIR}/cluster-formed")
    restored_file: str = setting("written by a restore's switch: start on the restored data without "
                                 "probing peers", "/run/etcd/restored")
    started_config_file: str = setting("fingerprint of the configuration the running etcd started with",
                                       "/run/etcd/started-config")
    state_dir: str = setting("spare state: `spare-watch.seen`, `spare-takeover.intent`, `takeover.json`",
                             "/var/lib/kcp")
    restore_dir: str = setting("snapshots staged by a restore", "/var/lib/etcd-restore")
    etcd_unit: str = setting("etcd's systemd unit", "etcd.service")
    etcdctl: str = setting("the etcdctl program", "etcdctl")
    lock_ttl_seconds: int = setting("lease of the replacement lock: a crashed holder frees it after this", 30)
    lock_wait_seconds: int = setting("how long a replacement waits for the lock", 90)
    join_timeout_seconds: int = setting("lease of a join key: how long a learner counts as joining", 300)
    promote_timeout_seconds: int = setting("how long the promoter waits for its learner to catch up", 300)
    spare_takeover_after_seconds: int = setting("how long a voter must look dead before a spare replaces it",
                                                300)
    defrag_free_percent: int = setting("`etcd-maintain` defragments a member once this share of its database "
                                       "file is free pages (dbSize - dbSizeInUse) ...", 30)
    defrag_free_min_mib: int = setting("... and at least this many MiB are free", 64)
    quota_warn_percent: int = setting("`etcd-maintain` warns in the journal once a member's database reaches "
                                      "this share of the quota (`ETCD_QUOTA_BACKEND_BYTES`)", 80)
    quota_fail_percent: int = setting("... and fails (the unit is failed) from this share on", 95)
    metrics_port: int = setting("port of `kcp-host metrics --serve` (the metrics file, on this member's address and "
                                "127.0.0.1; docs/alerts.md)", 2382)

    @property
    def member_id_file(self) -> str:
        """This member's ID (hex), beside the data it belongs to."""
        return f"{self.data_dir}/member/kcp-member-id"

    @property
    def not_a_member_file(self) -> str:
        """Why etcd stays stopped on this host (its slot was taken over, the stack dropped it)."""
        return f"{self.state_dir}/not-a-member"

    @property
    def metrics_file(self) -> str:
        """This host's metrics in Prometheus' text format, written by `kcp-host metrics` (docs/alerts.md)."""
        return f"{self.state_dir}/metrics/kcp.prom"

    @property
    def initial_cluster(self) -> str:
        return ",".join(self.members)


@dataclass(frozen=True)
class BackupEnv(EnvFile):
    PATH: ClassVar[str] = f"{ETCD_DIR}/backup.env"
    PREFIX: ClassVar[str] = "KCP_BACKUP_"
    OVERRIDE: ClassVar[str] = "KCP_BACKUP_ENV"
    DOC: ClassVar[str] = "the backup timer's destination and credentials"

    dest: str = setting("where snapshots go", example="ssh://etcd-backup@10.250.0.20/srv/etcd-backups/local, "
                        "gs://bucket/prefix, s3://bucket/prefix")
    cert: str = setting("client certificate used only by the backup job", example=f"{PKI}/backup-client.crt")
    key: str = setting("its key", example=f"{PKI}/backup-client.key")
    verify: bool = setting("restore every snapshot into a throwaway etcd before it counts", True)
    work_dir: str = setting("newest local snapshot and `status.json`", "/var/lib/etcd-backup")
    delta_seconds: int = setting("`etcd-delta-archive` closes and ships a chunk of the delta log this often "
                                 "(0: no delta log)", 0, example="10")
    ssh_key: str = setting("the host's key for the backup host's receiver (ssh:// only)", "",
                           example=BACKUP_SSH_KEY)
    ssh_known_hosts: str = setting("the backup host's key (ssh:// only): when present, the only key accepted "
                                   "(StrictHostKeyChecking=yes); absent, the key seen first is learned into it",
                                   BACKUP_SSH_KNOWN_HOSTS)


@dataclass(frozen=True)
class BootEnv(EnvFile):
    PATH: ClassVar[str] = "/etc/kcp/boot.env"
    PREFIX: ClassVar[str] = "KCP_BOOT_"
    OVERRIDE: ClassVar[str] = "KCP_BOOT_ENV"
    DOC: ClassVar[str] = "non-secret settings of a cloud machine's boot path (no secret is in here)"

    provider: str = setting("`gce` or `aws`", example="gce")
    cluster: str = setting("the cluster's name (AWS: the `kcp-cluster` tag of the slot's volume and interface)",
                           example="prod")
    roles: tuple[str, ...] = setting("this machine's roles", example="etcd,apiserver")
    programs_secrets: tuple[str, ...] = setting(
        "the secrets holding the host-programs bundle (the agent), read by kcp-bootstrap: its text in pieces that "
        "each fit a secret, in order", example="prod-host-programs,prod-host-programs-2")
    disk: str = setting("etcd's data disk: `persistent` or `local`", example="persistent")
    marker: str = setting("the cluster-formed marker object", example="gs://bucket/prod/cluster-formed")
    wait_seconds: int = setting("how long boot waits for a healthy etcd", 900)
    refresh_seconds: int = setting("how often `kcp-cloud-refresh.timer` re-fetches the bundles; also how long a "
                                   "refresh waits in line for the rollout lock", 300)
    forward_ports: tuple[str, ...] = setting("ports a destination-preserving load balancer delivers", (),
                                             example="2379,2381")
    lb_addresses: tuple[str, ...] = setting("load balancer addresses forwarded to this machine (GCE)", ())
    gce_project: str = setting("the GCE project (GCE only)", "")
    aws_region: str = setting("the AWS region (AWS only)", "")
    vpc_cidr: str = setting("the VPC's range, routed through the member's interface (AWS only)", "")


@dataclass(frozen=True)
class SlotEnv(EnvFile):
    PATH: ClassVar[str] = "/etc/kcp/slot.env"
    PREFIX: ClassVar[str] = "KCP_SLOT_"
    OVERRIDE: ClassVar[str] = "KCP_SLOT_ENV"
    DOC: ClassVar[str] = ("a cloud slot's name, releases and way to etcd, in the slot's bundle: a running machine "
                          "re-fetches its bundle (`cloud-refresh`), never its boot settings")

    name: str = setting("the slot, and the secret holding its bundle", example="prod-etcd-0")
    etcd_install: tuple[str, ...] = setting("`etcd-install` arguments: source, version, sha256 (API servers too: "
                                            "their etcdctl takes the rollout lock)", example="release,3.5.33,5025b5...")
    kubelet_install: tuple[str, ...] = setting("`kubelet-install` arguments (versions and sha256s)", ())
    etcd_endpoints: tuple[str, ...] = setting("API servers only (members have cluster.env): etcd's client URLs, "
                                              "where the rollout lock lives", ())
    etcd_client: tuple[str, ...] = setting("API servers only: CA, certificate and key of their etcd client", (),
                                           example="/etc/kubernetes/pki/etcd/ca.crt,...")


ENV_FILES: tuple[type[EnvFile], ...] = (ClusterEnv, BackupEnv, BootEnv, SlotEnv)
E = TypeVar("E", bound=EnvFile)


def env_name(cls: type[EnvFile], name: str) -> str:
    """`ClusterEnv, "data_dir"` -> `KCP_DATA_DIR`."""
    return cls.PREFIX + name.upper()


def _settings(cls: type[EnvFile]) -> list[tuple[dataclasses.Field[Any], type]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(kind: type, raw: str, name: str) -> object:
    if kind is bool:
        if raw not in ("true", "false"):
            raise ContractError(f"{name}={raw!r}: expected true or false")
        return raw == "true"
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ContractError(f"{name}={raw!r}: expected an integer") from None
    if kind is str:
        return raw
    return tuple(item for item in raw.split(",") if item)


def render_env(values: EnvFile, header: str) -> str:
    """The file's text: every required variable, and the optional ones that differ from their default.

    Values are shell-quoted, so the file can also be sourced (operators and tests do).
    """
    lines = [f"# {header}\n"]
    for f, _ in _settings(type(values)):
        value = getattr(values, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            lines.append(f"{env_name(type(values), f.name)}={shlex.quote(_text(value))}\n")
    return "".join(lines)


def parse_env_text(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines (values as a shell would read them); comments and blank lines skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, raw = line.partition("=")
        words = shlex.split(raw) if sep else None
        if not sep or not key.isidentifier() or words is None or len(words) > 1:
            raise ContractError(f"line {number}: expected KEY=VALUE, found {line[:60]!r}")
        values[key] = words[0] if words else ""
    return values


def load_env(cls: type[E], path: str | None = None, environ: Mapping[str, str] | None = None) -> E:
    """Read an env file. A variable missing from the file comes from the environment (a unit's
    `Environment=`), else from its default; a required one missing everywhere is an error."""
    environ = os.environ if environ is None else environ
    where = path or environ.get(cls.OVERRIDE) or cls.PATH
    try:
        given = parse_env_text(Path(where).read_text(encoding="utf-8"))
    except OSError as error:
        raise ContractError(f"cannot read {where}: {error.strerror}") from None
    except ContractError as error:
        raise ContractError(f"{where}: {error}") from None
    values: dict[str, object] = {}
    for f, kind in _settings(cls):
        name = env_name(cls, f.name)
        raw = given.get(name, environ.get(name, ""))
        if raw:
            values[f.name] = _parse(kind, raw, name)
        elif f.default is dataclasses.MISSING:
            raise ContractError(f"{name} is not set in {where}")
    return cls(**values)


@dataclass(frozen=True)
class HostPath:
    path: str
    mode: str
    doc: str


HOST_PATHS: tuple[HostPath, ...] = (
    HostPath(ETCD_ENV, "0644 root",
             "etcd's own `ETCD_*` flags (`EnvironmentFile=`); `ETCD_INITIAL_CLUSTER_STATE=new`"),
    HostPath(ClusterEnv.PATH, "0644 root", f"`{ClusterEnv.PREFIX}*`: {ClusterEnv.DOC} (below)"),
    HostPath(BackupEnv.PATH, "0644 root", f"`{BackupEnv.PREFIX}*`: {BackupEnv.DOC} (below)"),
    HostPath(BootEnv.PATH, "0644 root", f"`{BootEnv.PREFIX}*`: {BootEnv.DOC} (below; clouds only)"),
    HostPath(SlotEnv.PATH, "0644 root", f"`{SlotEnv.PREFIX}*`: {SlotEnv.DOC} (below; clouds only)"),
    HostPath(f"{PKI}/ca.crt", "0644", "etcd CA"),
    HostPath(f"{PKI}/server.{{crt,key}}", "0600 etcd",
             "member serving certificate; server and client usages, so the agent uses it as its client"),
    HostPath(f"{PKI}/peer.{{crt,key}}", "0600 etcd", "member peer certificate"),
    HostPath(f"{PKI}/backup-client.{{crt,key}}", "0600 root", "client certificate of the backup job only"),
    HostPath(BACKUP_SSH_KEY, "0600 root", "key for the backup host (bare metal only)"),
    HostPath(BACKUP_SSH_KNOWN_HOSTS, "0644 root", "the backup host's pinned key, from `baremetal.backupHost.hostKey` "
             "(bare metal; not shipped with trustOnFirstUse and no hostKey: the first backup learns it)"),
    HostPath(ClusterEnv.cluster_formed_file, "0644", "present once the cluster formed"),
    HostPath(ClusterEnv.join_env, "0644", "`ETCD_INITIAL_CLUSTER_STATE=existing` and `ETCD_INITIAL_CLUSTER`, "
             "written by `etcd-member-recovery` when joining (loaded after etcd.env, so it wins)"),
    HostPath(ClusterEnv.restored_file, "0644", "the new cluster token, written by a restore's `switch`"),
    HostPath(ClusterEnv.started_config_file, "0644", "sha256 of etcd.env (less its `ETCD_INITIAL_*`), the unit and "
             "the files etcd.env names, at the last start: a rollout restarts only a member whose input changed"),
    HostPath(DATA_DIR, "0700 etcd", "etcd's data dir"),
    HostPath(f"{DATA_DIR}/member/kcp-member-id", "0644", "this member's ID (hex), written by `etcd-member-promote`"),
    HostPath(f"{DATA_DIR}.<reason>-<UTC time>", "0700 etcd",
             "a data dir moved aside (empty, corrupt, removed, `pre-restore`); never deleted by the agent"),
    HostPath(ClusterEnv.state_dir, "0755 root", "spare state and `takeover.json` (docs/self-healing.md); "
             "`not-a-member`: why etcd stays stopped here (slot taken over, host dropped by the stack)"),
    HostPath(f"{ClusterEnv.state_dir}/metrics/kcp.prom", "0644 root", "this host's metrics (Prometheus text "
             "format), written every 30 s by `kcp-metrics.timer`, served on `KCP_METRICS_PORT` (docs/alerts.md)"),
    HostPath(f"{ClusterEnv.state_dir}/last-{{drill,restore}}.json", "0644 root", "the last DR drill's / restore's "
             "outcome (RTO, RPO), recorded by `scripts/status STACK --record-drill|--record-restore FILE`"),
    HostPath(BackupEnv.work_dir, "0700 root", "backup work dir: newest snapshot and metadata, `status.json`"),
    HostPath(ClusterEnv.restore_dir, "0700 root",
             "a restore's lock, and the snapshot it stages (deleted once restored or refused)"),
    HostPath("/usr/local/bin/etcd{,ctl,utl}", "0755", "the pinned release, or links to the distribution's"),
    HostPath(HOST_IDENTITY, "0644", "`<cluster>/<host>` this host is deployed as: a delete step of another "
             "name (a host renamed in place, a cluster renamed) leaves it alone"),
    HostPath(AGENT, "0755", "the host agent: the kcp_host package as one executable zip; "
             "`kcp-host SUBCOMMAND` (`kcp-host --help` lists them)"),
    HostPath(f"{LIB}/kcp-bootstrap", "0755", "clouds only: fetches the agent at every boot, then runs "
             "`kcp-host cloud-boot` (docs/cloud-targets.md)"),
    HostPath(REFRESH_APPLIED, "0644", "clouds only: sha256 of the agent's and the slot's bundles that "
             "`cloud-refresh` applied last; the same bundles again change nothing"),
    HostPath(SLOT_FILES, "0644", "clouds only: the files the slot's bundle placed, one per line; a file the next "
             "bundle lacks is removed (a unit stopped and disabled first)"),
    HostPath(STATIC_PODS_STARTED, "0644", "sha256 of what the static pods started on (the kubelet's release on the "
             "clouds, its, containerd's and every /etc/kubernetes file): `cloud-refresh`, and on bare metal "
             "`static-pods-restart`, restart them on a change, one host at a time"),
)


def markdown() -> str:
    """The tables of docs/host-layout.md."""
    out = ["| path | mode/owner | what |", "| --- | --- | --- |"]
    out += [f"| `{p.path}` | {p.mode} | {p.doc} |" for p in HOST_PATHS]
    for cls in ENV_FILES:
        out += ["", f"### `{cls.PATH}` ({cls.DOC})", "",
                "| variable | type | default | what |", "| --- | --- | --- | --- |"]
        for f, kind in _settings(cls):
            default = ("required" if f.default is dataclasses.MISSING
                       else f"`{_text(f.default)}`" if _text(f.default) else "empty")
            example = f" (e.g. `{f.metadata['example']}`)" if f.metadata["example"] else ""
            type_name = getattr(kind, "__name__", "list") if kind in (str, int, bool) else "list"
            out.append(f"| `{env_name(cls, f.name)}` | {type_name} | {default} | {f.metadata['doc']}{example} |")
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- BEGIN generated by kcp_host.contract -->\n", "<!-- END generated by kcp_host.contract -->\n"


def docs_with_tables(doc: str) -> str:
    """The document with its generated section replaced by today's tables."""
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ContractError("docs/host-layout.md lacks the generated section's markers")
    return head + BEGIN + markdown() + END + tail


def main(argv: list[str]) -> int:
    """`--check`: exit 1 when docs/host-layout.md differs from the contract; `--write`: update it."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "host-layout.md"
    current = doc.read_text(encoding="utf-8")
    wanted = docs_with_tables(current)
    if argv == ["--write"]:
        doc.write_text(wanted, encoding="utf-8")
        return 0
    if argv == ["--check"]:
        if wanted != current:
            print(f"{doc} differs from kcp_host/contract.py: run `python -m kcp_host.contract --write`",
                  file=sys.stderr)
            return 1
        return 0
    print("usage: python -m kcp_host.contract --check|--write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
