"""Mocks whose pulumi-tls and pulumi-random resources return real keys and certificates.

The certificates honour what the program declared (subject, DNS and IP SANs, allowed
uses, CA flag, validity and the signing CA), so etcd and HAProxy on the test hosts
verify the very chain that pulumi-tls would issue.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pulumi.runtime import mocks as pulumi_mocks

from tests.program import Mocks

SECRET_SIG = "4dabf18193072939515e22adb298388d"


def plain(value: Any) -> Any:
    """Unwrap Pulumi's serialized secrets, recursively."""
    if isinstance(value, dict):
        if SECRET_SIG in value and "value" in value:
            return plain(value["value"])
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _private_key(inputs: dict[str, Any]) -> Any:
    algorithm = inputs["algorithm"]
    if algorithm == "RSA":
        return rsa.generate_private_key(65537, int(inputs.get("rsaBits", 2048)))
    if algorithm == "ECDSA":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _key_outputs(key: Any) -> dict[str, str]:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key()
    return {
        "privateKeyPem": pem,
        "privateKeyOpenssh": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()).decode(),
        "publicKeyPem": public.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "publicKeyOpenssh": public.public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode() + "\n",
    }


def _name(subject: dict[str, Any]) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject["commonName"])]
    if subject.get("organization"):
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject["organization"]))
    if subject.get("organizationalUnit"):
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject["organizationalUnit"]))
    return x509.Name(attributes)


def _sign(subject: x509.Name, public_key: Any, issuer: x509.Name, issuer_key: Any, inputs: dict[str, Any],
          sans: list[x509.GeneralName], is_ca: bool) -> str:
    uses = set(inputs.get("allowedUses", []))
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=float(inputs["validityPeriodHours"])))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature="digital_signature" in uses, content_commitment=False,
                   key_encipherment="key_encipherment" in uses
                   and not isinstance(public_key, ec.EllipticCurvePublicKey),
                   data_encipherment=False, key_agreement=False, key_cert_sign="cert_signing" in uses,
                   crl_sign="crl_signing" in uses, encipher_only=False, decipher_only=False), critical=True))
    ekus = [oid for use, oid in (("server_auth", ExtendedKeyUsageOID.SERVER_AUTH),
                                 ("client_auth", ExtendedKeyUsageOID.CLIENT_AUTH)) if use in uses]
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _load_key(pem: str) -> Any:
    return serialization.load_pem_private_key(pem.encode(), None)


class RealTlsMocks(Mocks):
    """Like `Mocks`, with real cryptography behind every TLS and random resource."""

    def computed_outputs(self, args: pulumi_mocks.MockResourceArgs) -> dict[str, Any]:
        inputs = plain(dict(args.inputs))
        typ = args.typ
        if typ == "tls:index/privateKey:PrivateKey":
            return _key_outputs(_private_key(inputs))
        if typ == "tls:index/selfSignedCert:SelfSignedCert":
            key = _load_key(inputs["privateKeyPem"])
            name = _name(inputs["subject"])
            is_ca = bool(inputs.get("isCaCertificate"))
            return {"certPem": _sign(name, key.public_key(), name, key, inputs, [], is_ca)}
        if typ == "tls:index/certRequest:CertRequest":
            return {"certRequestPem": self._csr(inputs)}
        if typ == "tls:index/locallySignedCert:LocallySignedCert":
            csr = x509.load_pem_x509_csr(inputs["certRequestPem"].encode())
            ca_cert = x509.load_pem_x509_certificate(inputs["caCertPem"].encode())
            try:
                sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            except x509.ExtensionNotFound:
                sans = []
            return {"certPem": _sign(csr.subject, csr.public_key(), ca_cert.subject,
                                     _load_key(inputs["caPrivateKeyPem"]), inputs, sans, False)}
        if typ == "random:index/randomBytes:RandomBytes":
            raw = os.urandom(int(inputs["length"]))
            return {"base64": base64.b64encode(raw).decode(), "hex": raw.hex()}
        return super().computed_outputs(args)

    @staticmethod
    def _csr(inputs: dict[str, Any]) -> str:
        key = _load_key(inputs["privateKeyPem"])
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in inputs.get("dnsNames", [])]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in inputs.get("ipAddresses", [])]
        builder = x509.CertificateSigningRequestBuilder().subject_name(_name(inputs["subject"]))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
