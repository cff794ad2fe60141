"""GCS on loopback for the restore's tests: gcp-storage-emulator (a local stand-in for GCS's JSON API, in the test's
process) and this machine's own `gcloud` pointed at it, so the restore runs the very CLI calls an operator's runs.

The emulator does not take `gcloud storage cp`'s uploads (it answers them with a closed connection), so objects go
in through its JSON API (`upload`), with the object metadata etcd-backup's `--custom-metadata` gives them. It does
not check a download's generation either: the restore names the one it listed, which real GCS holds it to.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BUCKET = "kcp-unit-etcd-backups"
ENDPOINT = "KCP_TEST_GCS_ENDPOINT"  # where `upload` sends objects: the emulator's address


@contextlib.contextmanager
def emulated_gcs(config_dir: Path) -> Iterator[dict[str, str]]:
    """The emulator with an empty BUCKET; yields the environment that points `gcloud` at it."""
    why = "needs gcp-storage-emulator of requirements-dev.txt; runs once scripts/install-deps has installed it"
    server_module = pytest.importorskip("gcp_storage_emulator.server", reason=why)
    if shutil.which("gcloud") is None:
        pytest.skip(reason="the restore from GCS runs the operator's Google Cloud CLI, and no `gcloud` is on "
                           "PATH; runs once the Google Cloud SDK is installed "
                           "(https://cloud.google.com/sdk/docs/install; this machine kind has it at /usr/bin/gcloud)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    config_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield {"CLOUDSDK_CONFIG": str(config_dir), "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"http://127.0.0.1:{port}/",
               "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true", "CLOUDSDK_CORE_PROJECT": "kcp-test",
               "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
               "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true", ENDPOINT: f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


def custom_metadata(text: str) -> dict[str, str]:
    """`k=v,k=v` as `gcloud storage cp --custom-metadata` reads it (kcp_host.destinations.object_metadata's)."""
    return dict(item.partition("=")[::2] for item in text.split(",")) if text else {}


def upload(endpoint: str, key: str, data: bytes, metadata: dict[str, str]) -> dict[str, str]:
    """Create `key` in BUCKET with `metadata` (the JSON API's multipart upload); the object's resource."""
    boundary = "kcp-test-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': key, 'metadata': metadata})}\r\n--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart", data=body,
                                     method="POST",
                                     headers={"Content-Type": f"multipart/related; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        resource: dict[str, str] = json.loads(answer.read())
    return resource
