"""The agent suite: the host agent run as a program, against stand-ins (etcdctl, systemctl, the clouds) and against
real etcd, openssl, moto's S3 and a GCS emulator on loopback. No root: the integration tests run it on hosts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gcs import ENDPOINT, emulated_gcs


@pytest.fixture
def locked_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 (a local stand-in, in this process, on loopback) with a bucket as the stack declares it: versioned,
    Object Lock in governance mode with a default retention; this venv's AWS CLI pointed at it."""
    why = "needs moto and the AWS CLI of requirements-dev.txt; runs once scripts/install-deps has installed them"
    server_module = pytest.importorskip("moto.server", reason=why)
    if not (Path(sys.executable).parent / "aws").exists():
        pytest.skip(reason=why)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}.items():
        monkeypatch.setenv(key, value)
    try:
        bucket = "kcp-unit-etcd-backups"
        lock = {"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}}
        for args in (["create-bucket", "--object-lock-enabled-for-bucket"],
                     ["put-object-lock-configuration", "--object-lock-configuration", json.dumps(lock)]):
            subprocess.run(["aws", "s3api", *args, "--bucket", bucket], capture_output=True, check=True)
        yield bucket
    finally:
        # moto keeps its buckets in this process, not in the server: the next test starts from none.
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
        server.stop()


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """tests/gcs.py's emulated GCS with an empty bucket, and this machine's own `gcloud` pointed at it (no
    credentials, a configuration of its own); yields the emulator's address for `tests.gcs.upload`."""
    with emulated_gcs(tmp_path / "gcloud") as settings:
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        yield settings[ENDPOINT]
