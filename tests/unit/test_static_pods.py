"""`kcp-host static-pods-restart` (bare metal): after an update of a host's API server files, its static pods restart
from them and its API server is ready before the program moves on to the next host; nothing restarts where the
files are the ones the pods started on, or where no kubelet runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kcp_host import cli, staticpods, systemd
from kcp_host.log import Abort


class Host:
    """One API server host: its kubelet's files under `root`, its kubelet running or not; what restarts is kept."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.manifests = tmp_path / "etc/kubernetes/manifests"
        self.manifests.mkdir(parents=True)
        self.write("--etcd-compaction-interval=5m")
        self.record = tmp_path / "run/kcp/static-pods-started"
        self.kubelet = True
        self.ready = True
        self.steps: list[str] = []
        monkeypatch.setattr(staticpods, "KUBELET_READS", (str(tmp_path / "etc/kubernetes"),))
        monkeypatch.setattr(staticpods, "STATIC_PODS_STARTED", str(self.record))
        monkeypatch.setattr(systemd, "is_active", lambda unit: unit == "kubelet" and self.kubelet)
        monkeypatch.setattr(systemd, "act", lambda *args: self.steps.append(f"systemctl {' '.join(args)}"))
        monkeypatch.setattr(staticpods, "restart_static_pods", lambda: self.steps.append("restart"))
        monkeypatch.setattr(staticpods, "await_readyz", self.readyz)

    def write(self, flag: str) -> None:
        (self.manifests / "kube-apiserver.yaml").write_text(f"spec: {{containers: [{{command: [{flag}]}}]}}\n")

    def readyz(self, address: str, timeout: float) -> None:
        self.steps.append(f"readyz {address} {timeout:.0f}s")
        if not self.ready:
            raise Abort(1, f"https://{address}:6443/readyz not ready after {timeout:.0f}s")

    def run(self) -> int:
        self.steps.clear()
        return cli.main(["static-pods-restart", "--address", "10.0.0.5"])


RESTART = ["systemctl daemon-reload", "restart", "readyz 10.0.0.5 300s"]  # the bundle may carry new kubelet units


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    return Host(tmp_path, monkeypatch)


def test_the_pods_restart_once_their_files_changed_and_the_api_server_is_awaited(host: Host) -> None:
    assert host.run() == 0
    assert host.steps == RESTART, "no record of what they started on: restarted once"
    assert host.run() == 0 and host.steps == [], "the files they started on: no restart"
    host.write("--etcd-compaction-interval=0")
    assert host.run() == 0 and host.steps == RESTART
    assert host.run() == 0 and host.steps == []


def test_an_api_server_that_is_not_ready_fails_the_step_and_the_next_run_restarts_again(
        host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.ready = False
    assert host.run() == 1, "the program stops here: no later host restarts"
    assert "10.0.0.5:6443/readyz not ready after 300s" in capsys.readouterr().err
    assert not host.record.exists(), "nothing recorded: the pods are not known to run on these files"
    host.ready = True
    assert host.run() == 0 and host.steps == RESTART


def test_nothing_restarts_where_no_kubelet_runs(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.kubelet = False
    assert host.run() == 0 and host.steps == []
    assert "no kubelet runs here" in capsys.readouterr().out and not host.record.exists()
