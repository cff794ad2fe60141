"""A bounded etcd write load that logs every acknowledged write, for fault tests.

Runs as its own process (usually inside a test host's network namespace, where the
firewall lets clients reach etcd): it puts sequential keys through etcd's JSON gateway
(`/v3/kv/put`, served by 3.4 and 3.5 alike) with client-certificate TLS, moving to the
next endpoint whenever one fails or is slow, and appends one JSON line per acknowledged
key. Only a 200 answer carrying a revision counts as acknowledged, so the log is exactly
the set of writes that etcd promised to keep. Stdlib only.

    python writeload.py --endpoints https://a:2379,https://b:2379 --cacert ca.crt \
        --cert client.crt --key client.key --prefix t/run1/ --count 2000 --seconds 60 --out acks.jsonl
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Gateway:
    """One HTTPS connection per endpoint, reused, dropped on any error."""

    endpoints: list[str]
    context: ssl.SSLContext
    timeout: float
    current: int = 0
    _conns: dict[str, http.client.HTTPSConnection] = field(default_factory=dict)

    def _conn(self, endpoint: str) -> http.client.HTTPSConnection:
        if endpoint not in self._conns:
            url = urlsplit(endpoint)
            self._conns[endpoint] = http.client.HTTPSConnection(
                url.hostname or "", url.port or 2379, timeout=self.timeout, context=self.context)
        return self._conns[endpoint]

    def post(self, path: str, body: dict[str, str]) -> dict[str, object] | None:
        """The decoded answer of the current endpoint, or None (then the next endpoint is current)."""
        endpoint = self.endpoints[self.current]
        try:
            conn = self._conn(endpoint)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status == 200:
                return json.loads(data)
        except (OSError, http.client.HTTPException, ValueError):
            pass
        self._conns.pop(endpoint, None)
        self.current = (self.current + 1) % len(self.endpoints)
        return None


def put_until_acked(gw: Gateway, key: str, value: str, deadline: float) -> tuple[str, int] | None:
    """Retry one key on endpoint after endpoint until it is acknowledged or time is up.

    A retried put may land twice; with the same value that changes nothing the test checks.
    """
    while time.monotonic() < deadline and not _stop_requested:
        endpoint = gw.endpoints[gw.current]
        answer = gw.post("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        header = answer.get("header") if isinstance(answer, dict) else None
        if isinstance(header, dict) and "revision" in header:
            return endpoint, int(header["revision"])
        time.sleep(0.02)
    return None


_stop_requested = False


def _request_stop(_signum: int, _frame: object) -> None:
    """SIGTERM ends the load after the write in flight, so the log never ends mid-line."""
    global _stop_requested
    _stop_requested = True


def run(gw: Gateway, prefix: str, count: int, seconds: float, out: IO[str], interval: float) -> int:
    """Write keys prefix+00000000.. in order; returns how many were acknowledged."""
    deadline = time.monotonic() + seconds
    acked = 0
    for i in range(count):
        if _stop_requested:
            break
        key, value = f"{prefix}{i:08d}", f"v{i}"
        result = put_until_acked(gw, key, value, deadline)
        if result is None:
            break
        endpoint, revision = result
        out.write(json.dumps({"key": key, "value": value, "t": time.time(), "endpoint": endpoint,
                              "revision": revision}) + "\n")
        out.flush()
        acked += 1
        if interval:
            time.sleep(interval)
    return acked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", required=True, help="comma separated https client URLs")
    parser.add_argument("--cacert", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.01, help="pause between acknowledged writes")
    parser.add_argument("--timeout", type=float, default=0.5, help="per request, before trying the next endpoint")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if not 0 < args.count <= 1_000_000 or not 0 < args.seconds <= 3600:
        parser.error("--count must be in 1..1000000 and --seconds in (0, 3600]")
    context = ssl.create_default_context(cafile=args.cacert)
    context.load_cert_chain(args.cert, args.key)
    gw = Gateway(args.endpoints.split(","), context, args.timeout)
    signal.signal(signal.SIGTERM, _request_stop)
    with args.out.open("a") as out:
        acked = run(gw, args.prefix, args.count, args.seconds, out, args.interval)
    print(f"acknowledged {acked} of {args.count}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
