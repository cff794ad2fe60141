"""scripts/forget-host: a dead host leaves the state, nothing else does, and no reference to it stays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.program import ROOT

TYPE = "kcp:index:ControlPlane$command:remote:Command"


def urn(name: str) -> str:
    return f"urn:pulumi:local::resilient-control-plane::{TYPE}::{name}"


def export(tmp_path: Path) -> Path:
    resources = [
        {"urn": urn("local-h2-firewall"), "dependencies": [urn("local-h2-agent")]},
        {"urn": urn("local-h2-agent"), "dependencies": []},
        {"urn": urn("local-h3-firewall"), "dependencies": [urn("local-h2-firewall")],
         "propertyDependencies": {"stdin": [urn("local-h2-firewall")]}},
        {"urn": urn("local-h22-agent"), "dependencies": []},  # another host whose name starts alike
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"version": 3, "deployment": {"manifest": {}, "resources": resources}}))
    return path


def test_forgetting_a_host_removes_its_resources_and_every_reference_to_them(tmp_path: Path) -> None:
    out = tmp_path / "import.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "forget-host"), "h2", "--cluster", "local",
                           "--in", str(export(tmp_path)), "--out", str(out)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    resources = json.loads(out.read_text())["deployment"]["resources"]
    assert [r["urn"] for r in resources] == [urn("local-h3-firewall"), urn("local-h22-agent")]
    assert resources[0]["dependencies"] == [] and resources[0]["propertyDependencies"] == {"stdin": []}
    assert proc.stdout.count("forget ") == 2


def test_a_dry_run_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "import.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "forget-host"), "h2", "--cluster", "local",
                           "--in", str(export(tmp_path)), "--out", str(out), "--dry-run"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "forget " in proc.stdout and not out.exists()
