"""Samples, every 100 ms, how many etcd voters are healthy (test code; a process of its own, stdlib only).

Runs inside a test host's network namespace like writeload.py: it asks one member for the member
list (`/v3/cluster/member/list` through etcd's JSON gateway, client-certificate TLS), then every
voter for its status (`/v3/maintenance/status`) at once, over kept-alive connections. A voter counts
as down once two samples in a row (200 ms) got no answer with a leader: a restart or a crash lasts
seconds, while one slow answer on this shared 2-core test bed is not a member down.
One JSON line per sample: {"t", "voters", "healthy", "down", "listed"}.

    python voters.py --endpoints https://a:2379,... --cacert ca --cert c --key k --out samples.jsonl
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

_stop = False


def _request_stop(_signum: int, _frame: object) -> None:
    global _stop
    _stop = True


class Gateway:
    """One kept-alive HTTPS connection per endpoint, dropped on any error."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self.context, self.timeout = context, timeout
        self.conns: dict[str, http.client.HTTPSConnection] = {}

    def post(self, endpoint: str, path: str) -> dict[str, Any] | None:
        url = urlsplit(endpoint)
        conn = self.conns.pop(endpoint, None) or http.client.HTTPSConnection(
            url.hostname or "", url.port or 2379, timeout=self.timeout, context=self.context)
        try:
            conn.request("POST", path, "{}", {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            self.conns[endpoint] = conn
            return json.loads(body) if response.status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()
            return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--endpoints", "--cacert", "--cert", "--key", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.cacert)
    context.load_cert_chain(args.cert, args.key)
    signal.signal(signal.SIGTERM, _request_stop)
    deadline = time.monotonic() + min(args.seconds, 3600)
    gateway = Gateway(context, 0.5)
    known: list[dict[str, Any]] = []  # the member list needs a quorum on etcd 3.5: the last one seen stands
    misses: dict[str, int] = {}
    with open(args.out, "a") as out, ThreadPoolExecutor(max_workers=8) as pool:
        while not _stop and time.monotonic() < deadline:
            began = time.monotonic()
            endpoints = args.endpoints.split(",")
            listed = next((m for e in endpoints if (m := gateway.post(e, "/v3/cluster/member/list"))), None)
            if listed:
                known = [m for m in listed.get("members", []) if not m.get("isLearner") and m.get("clientURLs")]
            answers = pool.map(lambda m: gateway.post(m["clientURLs"][0], "/v3/maintenance/status"), known)
            for member, answer in zip(known, answers, strict=True):
                ok = bool(answer) and answer.get("leader", "0") != "0"
                misses[member["ID"]] = 0 if ok else misses.get(member["ID"], 0) + 1
            down = sorted(m.get("name", m["ID"]) for m in known if misses.get(m["ID"], 0) >= 2)
            out.write(json.dumps({"t": time.time(), "voters": len(known), "healthy": len(known) - len(down),
                                  "down": down, "listed": bool(listed)}) + "\n")
            out.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
