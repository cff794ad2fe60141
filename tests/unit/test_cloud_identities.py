"""Policies of the control-plane identities on GCE and AWS, on what the program declares for every shipped cloud stack
(and a colocated variant of one stack per cloud).

Machines run as one identity per role (components/targets/cloud.py), so that an internet-facing API server cannot read
an etcd member's peer and server keys, nor an etcd member the Kubernetes CA key. A secret is told apart by what its
bundle holds, not by its name; who may read it is worked out from the declared IAM: GCE's secret and project
bindings, AWS's role policies (GetSecretValue and the key's Decrypt, conditions included). Every test names the
identities and resources it found at fault.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from components.render.kubernetes import PKI as KUBERNETES_PKI
from components.targets import cloud
from kcp_host.contract import PKI as ETCD_PKI
from tests.conftest import ALL_STACKS
from tests.integration.realtls import plain
from tests.program import ROOT, Program, stack_config
from tests.unit.test_cloud_boot import COLOCATED

ETCD_MEMBER_KEYS = {f"{ETCD_PKI}/peer.key".lstrip("/"), f"{ETCD_PKI}/server.key".lstrip("/")}
KUBERNETES_CA_KEY = f"{KUBERNETES_PKI}/ca.key".lstrip("/")
# Roles that let a GCE principal read a secret's payload (bound on the secret or the project).
GCE_READING_ROLES = {"roles/secretmanager.secretAccessor", "roles/secretmanager.admin", "roles/owner"}
EC2_ATTACH = ("ec2:AttachVolume", "ec2:AttachNetworkInterface")


def _config(stack: str) -> dict[str, Any]:
    return stack_config(ROOT / "stacks" / f"Pulumi.{stack}.yaml")


CLOUD_STACKS = [s for s in ALL_STACKS if _config(s)["target"] in ("gce", "aws")]
VARIANTS = [(s, {}) for s in CLOUD_STACKS] + [(s, {"etcd": COLOCATED[s]}) for s in sorted(COLOCATED)]


@dataclass(frozen=True)
class Group:
    """A machine group: the slot its machines fill (the secret they fetch) and the identity they run as."""

    name: str
    slot: str
    identity: str


@dataclass
class Access:
    """One stack as its declared IAM lets it act. An identity is a GCE IAM member or an AWS role name."""

    groups: list[Group]
    identities: set[str]  # every identity declared, used by a group or not
    bundles: dict[str, set[str]]  # slot secret -> the paths its bundle holds
    programs: list[str]  # the host-programs secrets
    reads: Callable[[str, str], bool]  # (identity, secret) -> may read its payload
    bucket_users: set[str]  # identities granted anything on the backup bucket (GCE: any role, on it or a managed
    # folder in it; AWS: any S3 action)
    attachers: set[str]  # identities that may attach volumes or interfaces (AWS)

    def identities_of(self, holds: Callable[[set[str]], bool]) -> set[str]:
        """Identities of the groups whose bundle satisfies `holds`."""
        return {g.identity for g in self.groups if holds(self.bundles[g.slot])}

    def secrets_holding(self, holds: Callable[[set[str]], bool]) -> set[str]:
        return {s for s, files in self.bundles.items() if holds(files)}


def _runs_etcd(files: set[str]) -> bool:
    return bool(files & ETCD_MEMBER_KEYS)


def _serves_api(files: set[str]) -> bool:
    return KUBERNETES_CA_KEY in files


def _bundle_paths(versions: list[Any], field: str) -> dict[str, set[str]]:
    """Slot secret -> the paths in its bundle, from the declared secret versions (`<secret>-secret-version`)."""
    out = {}
    for version in versions:
        if "host-programs" in version.name:
            continue
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(plain(version.inputs[field])))) as tar:
            out[version.name.removesuffix("-secret-version")] = set(tar.getnames())
    return out


def _gce(program: Program, cluster: str) -> Access:
    templates = {t.urn: t for t in program.of_type("gcp:compute/instanceTemplate:InstanceTemplate")}
    member_slots = {c.inputs["instanceGroupManager"]: c.inputs["preservedState"]["metadata"]["kcp-slot"]
                    for c in program.of_type("gcp:compute/perInstanceConfig:PerInstanceConfig")}
    groups = []
    for group in [*program.of_type("gcp:compute/instanceGroupManager:InstanceGroupManager"),
                  *program.of_type("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager")]:
        (urn,) = group.property_dependencies["versions"]
        template = templates[urn].inputs
        slot = member_slots.get(group.inputs["name"]) or template["metadata"]["kcp-slot"]
        groups.append(Group(group.name, slot, f"serviceAccount:{template['serviceAccount']['email']}"))
    secret_grants = {(b.inputs["secretId"], b.inputs["member"])
                     for b in program.of_type("gcp:secretmanager/secretIamMember:SecretIamMember")
                     if b.inputs["role"] in GCE_READING_ROLES}
    project = program.of_type("gcp:projects/iAMMember:IAMMember")
    project_readers = {m.inputs["member"] for m in project if m.inputs["role"] in GCE_READING_ROLES}
    return Access(
        groups=groups,
        identities={f"serviceAccount:{a.name}@mock.iam.gserviceaccount.com"
                    for a in program.of_type("gcp:serviceaccount/account:Account")},
        bundles=_bundle_paths(program.of_type("gcp:secretmanager/secretVersion:SecretVersion"), "secretData"),
        programs=cloud.programs_secrets(cluster),
        reads=lambda identity, secret: (secret, identity) in secret_grants or identity in project_readers,
        bucket_users={b.inputs["member"] for b in program.of_type("gcp:storage/bucketIAMMember:BucketIAMMember")}
        | {f.inputs["member"] for f in program.of_type("gcp:storage/managedFolderIamMember:ManagedFolderIamMember")}
        | {m.inputs["member"] for m in project if m.inputs["role"].startswith(("roles/storage.", "roles/owner",
                                                                                  "roles/editor"))},
        attachers=set())


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _allows(statements: list[dict[str, Any]], action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether an Allow statement covers `action` on `resource` in `context`. StringEquals is evaluated (a key
    missing from the context fails it, as in IAM); any other condition counts as met, so "cannot" stays sound."""
    for s in statements:
        if s["Effect"] != "Allow" or not any(fnmatch.fnmatchcase(action, a) for a in _listed(s["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _listed(s["Resource"])):
            continue
        equals = s.get("Condition", {}).get("StringEquals", {})
        if all(key in context and context[key] in _listed(value) for key, value in equals.items()):
            return True
    return False


def _aws(program: Program, cluster: str, region: str) -> Access:
    assert not program.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment"), \
        "a managed policy is attached to a role: this evaluator reads inline policies only"
    assert not program.of_type("aws:secretsmanager/secretPolicy:SecretPolicy"), \
        "a secret has a resource policy: this evaluator reads role policies only"
    role_names = {f"{r.name}-id": r.inputs["name"] for r in program.of_type("aws:iam/role:Role")}
    statements: dict[str, list[dict[str, Any]]] = {name: [] for name in role_names.values()}
    for policy in program.of_type("aws:iam/rolePolicy:RolePolicy"):
        statements[role_names[policy.inputs["role"]]] += json.loads(policy.inputs["policy"])["Statement"]
    profiles = {f"arn:aws:mock:::{p.name}": p.inputs["role"]
                for p in program.of_type("aws:iam/instanceProfile:InstanceProfile")}
    templates = {t.urn: t for t in program.of_type("aws:ec2/launchTemplate:LaunchTemplate")}
    groups = []
    for group in program.of_type("aws:autoscaling/group:Group"):
        (urn,) = group.property_dependencies["launchTemplate"]
        profile = templates[urn].inputs["iamInstanceProfile"]["arn"]
        (slot,) = [t["value"] for t in group.inputs["tags"] if t["key"] == "kcp-slot"]
        groups.append(Group(group.name, slot, profiles[profile]))
    secrets = {s.inputs["name"]: s for s in program.of_type("aws:secretsmanager/secret:Secret")}

    def reads(role: str, secret: str) -> bool:
        arn, key = f"arn:aws:mock:::{secrets[secret].name}", secrets[secret].inputs["kmsKeyId"]
        unwrap = {"kms:ViaService": f"secretsmanager.{region}.amazonaws.com", "kms:EncryptionContext:SecretARN": arn}
        return _allows(statements[role], "secretsmanager:GetSecretValue", arn, {}) and \
            _allows(statements[role], "kms:Decrypt", key, unwrap)

    def may(*actions: str) -> set[str]:
        """Roles with an Allow on any action matching one of `actions` (patterns on both sides)."""
        return {role for role, st in statements.items() for s in st if s["Effect"] == "Allow" and any(
            fnmatch.fnmatchcase(a, granted) or fnmatch.fnmatchcase(granted, a)
            for a in actions for granted in _listed(s["Action"]))}

    return Access(
        groups=groups, identities=set(statements),
        bundles=_bundle_paths(program.of_type("aws:secretsmanager/secretVersion:SecretVersion"), "secretString"),
        programs=cloud.programs_secrets(cluster), reads=reads, bucket_users=may("s3:*"), attachers=may(*EC2_ATTACH))


@pytest.fixture(params=VARIANTS, ids=[f"{s}-colocated" if o else s for s, o in VARIANTS])
def access(request: pytest.FixtureRequest, declared) -> tuple[dict[str, Any], Access]:
    stack, overrides = request.param
    cfg = _config(stack) | overrides
    program = declared(stack, **overrides)
    if cfg["target"] == "gce":
        return cfg, _gce(program, cfg["clusterName"])
    return cfg, _aws(program, cfg["clusterName"], cfg["aws"]["region"])


def test_cloud_stacks_are_tested() -> None:
    assert {"gce-example", "gce-five", "aws-example", "aws-five"} <= set(CLOUD_STACKS)


def test_each_machine_group_runs_as_its_roles_identity(access) -> None:
    """etcd member groups share one identity, the API group another; colocated members (both roles) a third kind."""
    cfg, a = access
    by_role: dict[tuple[bool, bool], set[str]] = {}
    for group in a.groups:
        files = a.bundles[group.slot]
        by_role.setdefault((_runs_etcd(files), _serves_api(files)), set()).add(group.identity)
    for (etcd, api), identities in by_role.items():
        assert len(identities) == 1, f"groups running etcd={etcd} api={api} run as several identities: {identities}"
    used = [i for identities in by_role.values() for i in identities]
    assert len(set(used)) == len(used), f"two roles share an identity: {by_role}"
    assert set(used) == a.identities, f"identities no group runs as: {a.identities - set(used)}"
    expected = {(True, True)} if cfg["etcd"]["placement"] == "colocated" else {(True, False), (False, True)}
    assert set(by_role) == expected, f"machine roles {set(by_role)}, expected {expected}"


def test_each_slots_secret_is_readable_only_by_the_identity_its_machines_run_as(access) -> None:
    a = access[1]
    assert a.bundles, "no slot secret declared"
    for secret in a.bundles:
        readers = {i for i in a.identities if a.reads(i, secret)}
        fetchers = {g.identity for g in a.groups if g.slot == secret}
        assert readers == fetchers, f"secret {secret}: readable by {readers}, its machines run as {fetchers}"


def test_an_api_server_identity_cannot_read_any_etcd_members_secret(access) -> None:
    cfg, a = access
    api = a.identities_of(lambda f: _serves_api(f) and not _runs_etcd(f))
    members = a.secrets_holding(_runs_etcd)
    if cfg["etcd"]["placement"] == "dedicated":
        assert api and len(members) == cfg["etcd"]["members"], f"API identities {api}, member secrets {members}"
    for identity in api:
        for secret in members:
            assert not a.reads(identity, secret), f"API server identity {identity} can read {secret} (etcd keys)"


def test_an_etcd_identity_cannot_read_the_api_servers_secret(access) -> None:
    """The API servers' bundle holds the Kubernetes CA key (and the service-account and encryption keys)."""
    cfg, a = access
    etcd = a.identities_of(lambda f: _runs_etcd(f) and not _serves_api(f))
    api = a.secrets_holding(_serves_api)
    if cfg["etcd"]["placement"] == "dedicated":
        assert etcd and api == {cloud.api_slot(cfg["clusterName"])}, f"etcd identities {etcd}, API secrets {api}"
    for identity in etcd:
        for secret in api:
            assert not a.reads(identity, secret), f"etcd identity {identity} can read {secret} (Kubernetes CA key)"


def test_every_identity_can_read_the_host_programs(access) -> None:
    a = access[1]
    for identity in a.identities:
        for secret in a.programs:
            assert a.reads(identity, secret), f"{identity} cannot read {secret}: its machines could not boot"


def test_only_etcd_identities_may_write_backups(access) -> None:
    """Nor touch the backup bucket at all: API servers take no snapshot and never read the cluster-formed marker."""
    a = access[1]
    etcd = a.identities_of(_runs_etcd)
    assert a.bucket_users == etcd, f"backup bucket granted to {a.bucket_users}, etcd identities are {etcd}"


def test_only_etcd_identities_may_attach_volumes_and_interfaces(access) -> None:
    cfg, a = access
    etcd = a.identities_of(_runs_etcd)
    assert a.attachers == (etcd if cfg["target"] == "aws" else set()), f"attachers {a.attachers}, etcd {etcd}"
