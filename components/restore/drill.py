"""The DR drill's checks of a restored cluster, and its report (scripts/dr-drill).

Every member serves the same data with the recorded key count, and, when the restore kept the
snapshot's revision, the recorded hashkv (the restore refuses otherwise); the key count read back
equals the recorded one, and a random sample of keys reads back with a revision no newer than the
snapshot's. etcd answers in JSON (`-w json`): keys are base64 there,
so any key survives the trip, and no text table is parsed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shlex
import time
from datetime import datetime
from typing import Any

from components.restore import RestoreError
from components.restore.deltas import taken
from components.restore.plan import Plan
from kcp_host.contract import ClusterEnv

ETCDCTL = (f'. {ClusterEnv.PATH} && etcdctl --endpoints="$KCP_CLIENT_ENDPOINTS" --cacert="$KCP_ETCD_CA" '
           '--cert="$KCP_ETCD_CERT" --key="$KCP_ETCD_KEY" --command-timeout=30s')


def on_member(plan: Plan, command: str) -> str:
    """A shell command on the first member; its stdout."""
    proc = plan.ssh.run(plan.hosts[0].address, command, timeout=300)
    if proc.returncode != 0:
        raise RestoreError(f"{command[:60]}...: {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


def all_keys(plan: Plan) -> list[str]:
    """Every key of the restored cluster (undecodable bytes kept as surrogates, so a key can be asked again)."""
    answer = json.loads(on_member(plan, f'{ETCDCTL} get "" --prefix --keys-only -w json'))
    return [os.fsdecode(base64.b64decode(kv["key"])) for kv in answer.get("kvs") or []]


def mod_revisions(plan: Plan, keys: list[str]) -> list[int]:
    """The mod revision of each of these keys that reads back, in one round trip."""
    if not keys:
        return []
    out = on_member(plan, "; ".join(f"{ETCDCTL} get {shlex.quote(k)} -w json" for k in keys))
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [int(kv["mod_revision"]) for answer in answers for kv in answer.get("kvs") or []]


def check_data(plan: Plan, report: dict[str, Any], sample: int) -> dict[str, Any]:
    """Key count equals the recorded one; sampled keys are readable and no newer than the snapshot."""
    try:
        keys = all_keys(plan)
        chosen = random.sample(keys, min(sample, len(keys)))
        mod_revs = mod_revisions(plan, chosen)
    finally:
        plan.ssh.close(plan.addresses()[:1])
    newer = [r for r in mod_revs if r > report["revision"]]
    return {
        "key_count": {"ok": report.get("keys") is None or len(keys) == int(report["keys"]),
                      "recorded": report.get("keys"), "found": len(keys)},
        "sample": {"ok": len(mod_revs) == len(chosen) and not newer, "asked": len(chosen), "read": len(mod_revs),
                   "newer_than_snapshot": len(newer)},
        "revision_and_hashkv": {"ok": True, "revision": report["revision"], "hashkv": report["hashkv"],
                                "restored_revision": report["restored_revision"]},
    }


def drill_report(plan: Plan, report: dict[str, Any], checks: dict[str, Any], started: datetime) -> dict[str, Any]:
    """The drill's JSON: RPO is the age of the restored data when the drill started, RTO the restore's time to
    healthy. The restored data's time is the snapshot's `taken_at`, or with the delta log the last replayed
    revision's: a revision archived after the drill started is no loss (RPO 0), and an unknown time no RPO."""
    restored_at = taken(report)
    rpo = None if restored_at is None else round(max(0.0, (started - restored_at).total_seconds()), 1)
    return {
        "ok": all(c["ok"] for c in checks.values()),
        "snapshot": report["snapshot"], "taken_at": report["taken_at"], "drill_started_at": started.isoformat(),
        "rpo_seconds": rpo, "rto_seconds": report["rto_seconds"],
        "total_seconds": report["total_seconds"], "revision": report["revision"], "keys": report.get("keys"),
        "base_snapshot": report.get("base_snapshot", report["snapshot"]), "deltas": report.get("deltas"),
        "hosts": [h.name for h in plan.hosts], "checks": checks, "steps": report["steps"],
        "members": report.get("members", {}),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary(result: dict[str, Any]) -> str:
    """The one line an operator (or CI log) reads."""
    checks = result["checks"]
    verdict = "OK" if result["ok"] else "FAILED"
    rpo = "unknown" if result["rpo_seconds"] is None else f"{result['rpo_seconds']:.0f}s"
    return (f"dr-drill {verdict}: {result['snapshot']} rev {result['revision']} keys {checks['key_count']['found']}"
            f"/{result['keys']} sample {checks['sample']['read']}/{checks['sample']['asked']} "
            f"RPO {rpo} RTO {result['rto_seconds']:.2f}s")
