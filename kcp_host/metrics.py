"""metrics: what an etcd host knows of its backups, drills, takeovers, membership and certificates.

    kcp-host metrics [--backup-interval-seconds N]   write them to /var/lib/kcp/metrics/kcp.prom (the timer, 30 s)
    kcp-host metrics --serve                         serve that file on this member's address and 127.0.0.1
    kcp-host metrics --json                          print the same facts and the local member's status (scripts/status)
    kcp-host metrics --record-drill|--record-restore store a drill's or restore's outcome (JSON on stdin)

The file is in Prometheus' text format (node_exporter's textfile collector can read its folder too);
the server only ever sends that file, so a scrape costs no etcd call. etcd's own metrics (leader,
database size and quota, proposals) stay on its port 2381. docs/alerts.md: the metrics and the alerts.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import json
import math
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kcp_host import systemd
from kcp_host.contract import ETCD_ENV, BackupEnv, ClusterEnv, ContractError, load_env, parse_env_text
from kcp_host.etcd import Etcdctl, Member
from kcp_host.files import read_json, write_atomic, write_json
from kcp_host.log import Abort

BACKUP_TIMER = "etcd-backup.timer"
KUBERNETES_PKI = ("/etc/kubernetes/pki", "/etc/kubernetes/pki/etcd")
_STAMP = re.compile(r"-(\d{8}T\d{6}Z)$")  # a snapshot's name ends with the UTC time it was taken
RECORD_FIELDS: dict[str, type] = {"finished_at": float, "rto_seconds": float, "rpo_seconds": float, "ok": bool,
                                  "snapshot": str}


def epoch(text: object, layout: str = "%Y-%m-%dT%H:%M:%SZ") -> float | None:
    """A UTC time written by the agent (utc_iso, utc_stamp) as epoch seconds; None if absent or unreadable."""
    try:
        return float(calendar.timegm(time.strptime(str(text), layout))) if text else None
    except ValueError:
        return None


# -- certificates: notAfter from the DER, no third-party library -----------------------------------------
def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start, end) of the content of the DER element at `at`."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, at = int.from_bytes(der[at:at + count], "big"), at + count
    if at + length > len(der):
        raise ValueError("truncated certificate")
    return tag, at, at + length


def not_after(pem: str) -> float:
    """Certificate > tbsCertificate > [version], serial, signature, issuer, validity > notBefore, notAfter."""
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    der = base64.b64decode("".join(body.split()))
    _, tbs, _ = _element(der, _element(der, 0)[1])
    fields, at = [], tbs
    for _ in range(5):
        tag, _, end = _element(der, at)
        fields.append((tag, at))
        at = end
    validity = fields[4 if fields[0][0] == 0xA0 else 3][1]
    _, start, _ = _element(der, validity)
    tag, start, end = _element(der, _element(der, start)[2])
    layout = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}.get(tag)
    value = epoch(der[start:end].decode("ascii"), layout) if layout else None
    if value is None:
        raise ValueError("no readable notAfter")
    return value


def certificates(env: ClusterEnv) -> list[dict[str, Any]]:
    """Every *.crt of etcd's folder (and Kubernetes' where this host has them), with its notAfter."""
    found = []
    for folder in dict.fromkeys((str(Path(env.etcd_cert).parent), *KUBERNETES_PKI)):
        for path in sorted(Path(folder).glob("*.crt")):
            try:
                found.append({"path": str(path), "not_after": not_after(path.read_text(encoding="ascii"))})
            except (OSError, ValueError, IndexError, UnicodeError) as error:
                found.append({"path": str(path), "error": str(error) or type(error).__name__})
    return found


# -- facts -------------------------------------------------------------------------------------------------
def membership(env: ClusterEnv, members: list[Member] | None) -> dict[str, Any] | None:
    """The cluster's members against the stack's (cluster.env), by peer URL; None when no member answered."""
    if members is None:
        return None
    declared = {url: name for name, _, url in (m.partition("=") for m in env.members)}
    real = {url: m for m in members for url in m.peer_urls}
    me = next((m for m in members if env.peer_url in m.peer_urls), None)
    return {
        "members": [{"id": m.hex_id, "name": m.name, "peer_urls": list(m.peer_urls),
                     "client_urls": list(m.client_urls), "learner": m.learner} for m in members],
        "voter": me is not None and not me.learner,
        "undeclared": [{"name": m.name, "peer_url": url, "learner": m.learner}
                       for url, m in real.items() if url not in declared],
        "missing": [{"name": name, "peer_url": url} for url, name in declared.items() if url not in real],
    }


def backup_facts(env: ClusterEnv, interval: int | None) -> dict[str, Any] | None:
    """status.json of this host's backup job (docs/backups.md), as epoch seconds; None without backup.env."""
    try:
        backup = load_env(BackupEnv)
    except ContractError:
        return None
    status = read_json(Path(backup.work_dir) / "status.json")
    success, failure = epoch(status.get("last_success")), epoch(status.get("last_failure"))
    stamp = _STAMP.search(str(status.get("last_snapshot", "")))
    failed_last = failure is not None and (success is None or failure > success)
    return {
        "last_snapshot": status.get("last_snapshot"), "last_success": success,
        "last_snapshot_taken": epoch(stamp[1], "%Y%m%dT%H%M%SZ") if stamp else None,
        "last_verified": epoch(status.get("last_verified")), "last_failure": failure,
        "last_failure_reason": status.get("last_failure_reason"), "last_run_failed": failed_last,
        "verification_failed": failed_last and "failed verification" in str(status.get("last_failure_reason")),
        "timer_active": systemd.is_active(BACKUP_TIMER), "interval_seconds": interval,
        "delta_seconds": backup.delta_seconds, "last_delta": epoch(status.get("last_delta_at")),
        "last_delta_revision": status.get("last_delta_revision"),
    }


def takeover_facts(env: ClusterEnv) -> dict[str, Any] | None:
    """takeover.json (docs/self-healing.md), and whether the stack adopted it: cluster.env lists this spare and
    no longer the member it replaced."""
    report = read_json(Path(env.state_dir) / "takeover.json")
    if not report:
        return None
    declared = {url for m in env.members for url in [m.partition("=")[2]]}
    replaced = str(report.get("replaced", {}).get("peer_urls", "")).split(",")
    return {**report, "at": epoch(report.get("time")),
            "adopted": env.peer_url in declared and not declared.intersection(filter(None, replaced))}


def records(env: ClusterEnv) -> dict[str, dict[str, Any] | None]:
    return {kind: read_json(Path(env.state_dir) / f"last-{kind}.json") or None for kind in ("drill", "restore")}


def local_status(env: ClusterEnv, ctl: Etcdctl) -> dict[str, Any]:
    """The local member as `endpoint status` and a linearizable read through it see it (scripts/status)."""
    status = ctl.status(env.client_url)
    healthy = ctl.health([env.client_url]).get(env.client_url, False)
    if status is None:
        return {"answered": False, "healthy": healthy}
    header = status.get("header", {})
    return {"answered": True, "healthy": healthy, "id": f"{int(header.get('member_id', 0)):x}",
            "leader": header.get("member_id") == status.get("leader"), "learner": bool(status.get("isLearner")),
            "db_size": status.get("dbSize", 0), "db_size_in_use": status.get("dbSizeInUse", 0),
            "revision": header.get("revision", 0), "raft_term": header.get("raft_term", 0),
            "version": status.get("version", ""), "errors": status.get("errors", [])}


def quota_bytes(etcd_env: str) -> int:
    """ETCD_QUOTA_BACKEND_BYTES from etcd.env; etcd's default (2 GiB) when unset or unreadable."""
    try:
        raw = parse_env_text(Path(etcd_env).read_text(encoding="utf-8")).get("ETCD_QUOTA_BACKEND_BYTES", "")
        return int(raw) if raw and int(raw) > 0 else 2 * 1024**3
    except (OSError, ValueError, ContractError):
        return 2 * 1024**3


def collect(env: ClusterEnv, interval: int | None, with_status: bool = False,
            etcd_env: str = ETCD_ENV) -> dict[str, Any]:
    ctl = Etcdctl.of(env)
    formed = Path(env.cluster_formed_file)
    not_a_member = Path(env.not_a_member_file)
    facts: dict[str, Any] = {
        "cluster": env.cluster_name, "host": env.member_name, "peer_url": env.peer_url, "time": time.time(),
        "declared": [dict(zip(("name", "peer_url"), m.split("=", 1), strict=True)) for m in env.members],
        "formed_at": formed.stat().st_mtime if formed.exists() else None,
        "not_a_member": not_a_member.read_text().strip() if not_a_member.is_file() else None,
        "membership": membership(env, ctl.members(env.client_endpoints)),
        "backup": backup_facts(env, interval), "takeover": takeover_facts(env), **records(env),
        "certificates": certificates(env),
    }
    if with_status:
        facts["status"] = {**local_status(env, ctl), "quota": quota_bytes(etcd_env)}
    return facts


# -- Prometheus text format ---------------------------------------------------------------------------------
def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    quoted = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, quoted, strict=True)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def exposition(facts: dict[str, Any]) -> str:
    out: list[str] = []

    def gauge(name: str, doc: str, *samples: tuple[dict[str, Any], float | None]) -> None:
        kept = [(labels, value) for labels, value in samples if value is not None]
        if kept:
            out.extend((f"# HELP {name} {doc}", f"# TYPE {name} gauge"))
            out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in kept)

    gauge("kcp_host_info", "This etcd host: its cluster and member name.",
          ({"cluster_name": facts["cluster"], "host": facts["host"]}, 1))
    gauge("kcp_metrics_last_collect_timestamp_seconds", "When kcp-host metrics wrote this file.",
          ({}, facts["time"]))
    gauge("kcp_cluster_formed_timestamp_seconds", "When this host marked its cluster formed.",
          ({}, facts["formed_at"]))
    if (view := facts["membership"]) is not None:
        gauge("kcp_etcd_voter", "1 if this host is a voting member of the cluster.", ({}, int(view["voter"])))
        differences = [({"name": m["name"], "peer_url": m["peer_url"], "state": state}, 1)
                       for state in ("undeclared", "missing") for m in view[state]]
        gauge("kcp_membership_drift", "Members in the cluster but not in the stack, plus the reverse.",
              ({}, len(differences)))
        gauge("kcp_membership_difference", "A member in the cluster only (undeclared) or in the stack only (missing).",
              *differences)
    if (backup := facts["backup"]) is not None:
        gauge("kcp_backup_interval_seconds", "The backup timer's interval.", ({}, backup["interval_seconds"]))
        gauge("kcp_backup_timer_active", "1 while etcd-backup.timer is active on this host.",
              ({}, int(backup["timer_active"])))
        for name, key, what in (("last_success", "last_success", "the newest snapshot this host stored"),
                                ("last_snapshot", "last_snapshot_taken", "that snapshot was taken (recovery point)"),
                                ("last_verified", "last_verified", "this host last verified a snapshot"),
                                ("last_failure", "last_failure", "this host's backup job last failed")):
            gauge(f"kcp_backup_{name}_timestamp_seconds", f"When {what}; 0: never.", ({}, backup[key] or 0))
        gauge("kcp_backup_last_verification_failed", "1 if this host's newest backup run failed verification.",
              ({}, int(backup["verification_failed"])))
        if backup["delta_seconds"]:  # the delta log (docs/backups.md), written by the archiver while it leads
            gauge("kcp_delta_interval_seconds", "How often the leader's archiver ships a chunk of the delta log.",
                  ({}, backup["delta_seconds"]))
            gauge("kcp_delta_last_archived_timestamp_seconds", "When this host's archiver last knew every revision "
                  "archived (recovery point); 0: never.", ({}, backup["last_delta"] or 0))
            gauge("kcp_delta_last_archived_revision", "The newest revision this host's archiver shipped; 0: none.",
                  ({}, backup["last_delta_revision"] or 0))
    if (takeover := facts["takeover"]) is not None:
        labels = {"replaced": takeover.get("replaced", {}).get("name", ""),
                  "replaced_member_id": takeover.get("replaced", {}).get("member_id", "")}
        gauge("kcp_takeover_timestamp_seconds", "When this spare took over the replaced member's slot.",
              (labels, takeover["at"]))
        gauge("kcp_takeover_adopted", "1 once the stack lists this spare instead of the member it replaced.",
              (labels, int(takeover["adopted"])))
    for kind in ("drill", "restore"):
        record = facts[kind] or {}
        gauge(f"kcp_{kind}_last_timestamp_seconds", f"When the last recorded {kind} finished; 0: none recorded.",
              ({}, record.get("finished_at", 0)))
        gauge(f"kcp_{kind}_last_rto_seconds", f"The last recorded {kind}'s time to a healthy cluster.",
              ({}, record.get("rto_seconds")))
        gauge(f"kcp_{kind}_last_rpo_seconds", f"The last recorded {kind}'s data loss window (snapshot age).",
              ({}, record.get("rpo_seconds")))
    gauge("kcp_drill_last_success_timestamp_seconds", "When the last recorded successful drill finished; 0: none.",
          ({}, (facts["drill"] or {}).get("last_success", 0)))
    gauge("kcp_certificate_expiry_timestamp_seconds", "A certificate's notAfter.",
          *(({"path": c["path"]}, c.get("not_after")) for c in facts["certificates"]))
    return "\n".join(out) + "\n"


# -- commands -----------------------------------------------------------------------------------------------
def _field(value: object, kind: type) -> object:
    """A value of the record's type, else None (a number must be finite; a bool is no number)."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    return value[:200] if kind is str and isinstance(value, str) else None


def record(env: ClusterEnv, kind: str, text: str) -> None:
    """A drill's or restore's outcome, as scripts/status sends it; a failed one keeps the last success's time."""
    try:
        given = json.loads(text)
    except ValueError as error:
        raise Abort(2, f"--record-{kind}: not JSON: {error}") from None
    if not isinstance(given, dict) or _field(given.get("finished_at"), float) is None:
        raise Abort(2, f"--record-{kind}: expected a JSON object with finished_at (epoch seconds)")
    value = {key: field for key, kind_ in RECORD_FIELDS.items() if (field := _field(given.get(key), kind_)) is not None}
    path = Path(env.state_dir) / f"last-{kind}.json"
    value["last_success"] = value["finished_at"] if value.get("ok") else read_json(path).get("last_success", 0)
    write_json(path, value)


def serve(env: ClusterEnv, path: Path) -> None:
    """Only GET /metrics, only the file: nothing a scraper sends reaches etcd or the disk."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                body = path.read_bytes() if self.path.split("?", 1)[0] == "/metrics" else None
            except OSError:
                self.send_error(503, "no metrics written yet")
                return
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # a scrape every few seconds would flood the journal

    address = urlsplit(env.client_url).hostname or "127.0.0.1"
    servers = [ThreadingHTTPServer((host, env.metrics_port), Handler) for host in dict.fromkeys((address, "127.0.0.1"))]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host metrics", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="serve the metrics file on KCP_METRICS_PORT")
    mode.add_argument("--json", action="store_true", help="print the facts and the local member's status as JSON")
    mode.add_argument("--record-drill", action="store_true", help="store a DR drill's outcome (JSON on stdin)")
    mode.add_argument("--record-restore", action="store_true", help="store a restore's outcome (JSON on stdin)")
    parser.add_argument("--backup-interval-seconds", type=int, help="the backup timer's interval (a metric)")
    parser.add_argument("--etcd-env", default=ETCD_ENV, help="etcd's env file (the quota)")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    if args.serve:
        serve(env, Path(env.metrics_file))
    elif args.record_drill or args.record_restore:
        record(env, "drill" if args.record_drill else "restore", sys.stdin.read())
    elif args.json:
        print(json.dumps(collect(env, args.backup_interval_seconds, True, args.etcd_env), indent=2, sort_keys=True))
    else:
        write_atomic(env.metrics_file, exposition(collect(env, args.backup_interval_seconds)))
    return 0


