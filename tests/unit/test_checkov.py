"""checkov's Kubernetes checks on the rendered static pods find nothing beyond the findings accepted
below, each with the reason it is accepted (docs/security.md repeats them)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from components.render import kubernetes
from components.render.kubernetes import ApiServerSettings
from tests.program import ROOT

CHECKOV = ROOT / ".venv" / "tools" / "bin" / "checkov"
ALL = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ACCEPTED: dict[str, tuple[tuple[str, ...], str]] = {
    "CKV_K8S_11": (ALL, "no CPU limit: a throttled control plane fails its health checks (kubeadm sets none)"),
    "CKV_K8S_13": (ALL, "no memory limit: an OOM-killed API server is an outage (kubeadm sets none)"),
    "CKV_K8S_15": (ALL, "IfNotPresent, not Always: a static pod must restart without the registry"),
    "CKV_K8S_19": (ALL, "host network: the control plane serves on the node's address"),
    "CKV_K8S_22": (ALL, "writable root: controller-manager and scheduler write serving certs to --cert-dir"),
    "CKV_K8S_23": (ALL, "root: the keys are root's, 0600, as kubeadm lays them out (every capability dropped)"),
    "CKV_K8S_40": (ALL, "root UID: as CKV_K8S_23"),
    "CKV_K8S_43": (ALL, "tag, not digest: registry.k8s.io cannot be read here to pin digests; tags are versions"),
    "CKV2_K8S_6": (ALL, "no NetworkPolicy: host-network static pods; nftables guards the ports"),
    "CKV_K8S_68": (("kube-apiserver",), "anonymous only for /livez,/readyz,/healthz via AuthenticationConfiguration"),
    "CKV_K8S_80": (("kube-apiserver",), "AlwaysPullImages off (kubeadm's default): every pod start would need "
                   "the registry"),
    "CKV_K8S_81": (("kube-apiserver",), "SecurityContextDeny was removed in Kubernetes 1.30"),
    "CKV_K8S_84": (("kube-apiserver",), "PodSecurityPolicy was removed in Kubernetes 1.25"),
    "CKV_K8S_88": (("kube-apiserver",), "--insecure-port was removed in Kubernetes 1.24"),
    "CKV_K8S_97": (("kube-apiserver",), "--service-account-key-file is set (sa.pub); the check wants a .pem name"),
    "CKV_K8S_110": (("kube-controller-manager",), "--service-account-private-key-file is set (sa.key)"),
    "CKV_K8S_111": (("kube-controller-manager",), "--root-ca-file is set (ca.crt)"),
}


def rendered(tmp_path: Path) -> Path:
    s = ApiServerSettings("1.36.4", ("https://10.0.0.11:2379",), "10.96.0.0/12", "10.244.0.0/16", "cluster.local",
                          "https://10.0.0.100:6443")
    for name, text in zip(ALL, (kubernetes.apiserver_manifest(s), kubernetes.controller_manager_manifest(s),
                                kubernetes.scheduler_manifest(s)), strict=True):
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def test_checkov_finds_nothing_new_on_the_static_pods(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.skip(reason="checkov is not installed in .venv/tools: run scripts/install-deps")
    proc = subprocess.run([str(CHECKOV), "-d", str(rendered(tmp_path)), "--framework", "kubernetes", "--quiet",
                           "--compact", "-o", "json"], capture_output=True, text=True, timeout=300, check=False)
    reports = json.loads(proc.stdout)
    failed = {(f["check_id"], Path(f["file_path"]).stem)
              for r in (reports if isinstance(reports, list) else [reports]) for f in r["results"]["failed_checks"]}
    accepted = {(check, pod) for check, (pods, _) in ACCEPTED.items() for pod in pods}
    assert failed - accepted == set(), f"new checkov findings: {sorted(failed - accepted)}"
    assert accepted - failed == set(), f"accepted findings checkov no longer reports (drop them): {accepted - failed}"
