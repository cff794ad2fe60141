"""Policies of the cluster PKI, checked on what the program declares for every stack."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ALL_STACKS
from tests.integration.realtls import SECRET_SIG
from tests.program import Program

CSR = "tls:index/certRequest:CertRequest"
CA = "tls:index/selfSignedCert:SelfSignedCert"
SIGNED = "tls:index/locallySignedCert:LocallySignedCert"


def _plaintext_private_keys(value: Any, path: str = "") -> list[str]:
    """Paths under which a private key appears outside a Pulumi secret."""
    if isinstance(value, dict):
        if SECRET_SIG in value:
            return []
        return [p for k, v in value.items() for p in _plaintext_private_keys(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _plaintext_private_keys(v, f"{path}[{i}]")]
    if isinstance(value, str) and "PRIVATE KEY" in value:
        return [path]
    return []


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_no_private_key_appears_outside_a_secret(declared, stack: str) -> None:
    program: Program = declared(stack)
    for resource in program.resources:
        if resource.type.startswith(("tls:", "random:")):
            continue  # the providers themselves, which hold keys as secret outputs
        leaks = _plaintext_private_keys(resource.inputs)
        assert not leaks, f"{resource.name} ({resource.type}) carries a private key in plain text at {leaks}"


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_three_separate_certificate_authorities(declared, stack: str) -> None:
    cas = declared(stack).of_type(CA)
    names = sorted(r.inputs["subject"]["commonName"] for r in cas)
    assert names == ["etcd-ca", "front-proxy-ca", "kubernetes"]
    assert all(r.inputs["isCaCertificate"] for r in cas)


def test_api_server_certificate_names_every_way_clients_reach_it(declared) -> None:
    csr = declared("local").named("local-pki-apiserver-csr").inputs
    assert {"kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local", "localhost"} <= set(csr["dnsNames"])
    assert {"10.96.0.1", "127.0.0.1", "10.250.0.100", "10.250.0.11", "10.250.0.12",
            "10.250.0.13"} <= set(csr["ipAddresses"]), csr["ipAddresses"]


@pytest.mark.parametrize("member", ["h1", "h2", "h3", "spare1"])
def test_etcd_server_certificate_names_member_loopback_and_load_balancer(declared, member: str) -> None:
    csr = declared("local").named(f"local-pki-etcd-server-{member}-csr").inputs
    address = {"h1": "10.250.0.11", "h2": "10.250.0.12", "h3": "10.250.0.13", "spare1": "10.250.0.14"}[member]
    assert {address, "127.0.0.1", "10.250.0.100"} <= set(csr["ipAddresses"])
    assert {member, "localhost"} <= set(csr["dnsNames"])


def test_client_certificates_carry_only_client_usage_and_their_identity(declared) -> None:
    program = declared("local")
    expected = {"apiserver-etcd-client": "kube-apiserver-etcd-client", "etcd-backup-client": "etcd-backup",
                "controller-manager": "system:kube-controller-manager", "scheduler": "system:kube-scheduler",
                "admin": "kubernetes-admin", "front-proxy-client": "front-proxy-client"}
    for name, common_name in expected.items():
        assert program.named(f"local-pki-{name}-csr").inputs["subject"]["commonName"] == common_name
        uses = program.named(f"local-pki-{name}").inputs["allowedUses"]
        assert "client_auth" in uses and "server_auth" not in uses, f"local-pki-{name}: {uses}"
    assert program.named("local-pki-admin-csr").inputs["subject"]["organization"] == "system:masters"


def test_changing_rotation_reissues_leaves_but_keeps_the_cas(declared) -> None:
    before, after = declared("local"), declared("local", pki={"rotation": 1})
    for csr in after.of_type(CSR):
        assert csr.inputs["subject"]["organizationalUnit"] == "rotation-1", csr.name
    by_name = lambda program: {r.name: r.inputs for r in program.of_type(CA)}  # noqa: E731 (registration order varies)
    assert by_name(before) == by_name(after)
