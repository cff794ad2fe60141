"""Upgrading a running cloud cluster to this program from release be3abab, where one identity ran every machine, and
from cbcd4a8, the previous one: the second `pulumi up` planned by the engine's rules (tests/integration/update_plan.py)
from what that release declared (tests/releases/capture.py) and what this program declares on the same state.

The member groups never roll on a template change (docs/cloud-targets.md), so the upgrade must leave the members on
a live identity; and the deletes the engine runs at the end of the up must not remove what the up just declared
(two resources that manage one cloud object: the later delete wins).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.integration.realtls import plain
from tests.integration.update_plan import UpdatePlan, plan_update, rerun_program
from tests.program import Declared, Program

RELEASES = Path(__file__).resolve().parents[1] / "releases"
# be3abab: one shared identity; cbcd4a8: one identity per role, the members' named by its role.
CAPTURES = [(release, stack) for release in ("be3abab", "cbcd4a8")
            for stack in ("gce-example", "aws-example", "gce-example-colocated", "aws-example-colocated")]

# What each cloud API knows an object by (its import ID's parts): two resources with equal keys manage one object.
PHYSICAL_KEYS = {
    "gcp:serviceaccount/account:Account": ("project", "accountId"),
    "gcp:projects/iAMMember:IAMMember": ("project", "role", "member"),
    "gcp:secretmanager/secretIamMember:SecretIamMember": ("project", "secretId", "role", "member"),
    "gcp:storage/bucketIAMMember:BucketIAMMember": ("bucket", "role", "member"),
    "aws:iam/role:Role": ("name",),
    "aws:iam/instanceProfile:InstanceProfile": ("name",),
    "aws:iam/rolePolicy:RolePolicy": ("role", "name"),
}
IDENTITY_TYPES = ("gcp:serviceaccount/account:Account", "aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile")
MEMBER_TEMPLATES = {"gcp:compute/instanceTemplate:InstanceTemplate": "serviceAccount",
                    "aws:ec2/launchTemplate:LaunchTemplate": "iamInstanceProfile"}


def _capture_module() -> ModuleType:
    """tests/releases/capture.py, which runs from a release's checkout: loaded by its path, not as a package."""
    spec = importlib.util.spec_from_file_location("release_capture", RELEASES / "capture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def upgrade(capture: tuple[str, str]) -> UpdatePlan:
    """The captured release stores bundles and other large values by their sha256: this program's are compared in
    the same form, so an unchanged bundle plans no change (compared raw, every bundle looked changed)."""
    release, stack = capture
    with gzip.open(RELEASES / f"{release}.json.gz", "rt", encoding="utf-8") as f:
        captured = json.load(f)["captures"][stack]
    before = Program([Declared(**r) for r in captured["resources"]], captured["outputs"], captured["generation"])
    after = rerun_program(captured["config"], before, stack=captured["stack"])
    digested = _capture_module().digested
    after = Program([Declared(**digested(dataclasses.asdict(r))) for r in after.resources], digested(after.outputs),
                    after.generation)
    return plan_update(before, after)


def physical_key(declared: Declared) -> tuple[Any, ...] | None:
    fields = PHYSICAL_KEYS.get(declared.type)
    inputs = plain(declared.inputs)
    return None if fields is None else (declared.type, *(json.dumps(inputs.get(f), sort_keys=True) for f in fields))


@pytest.mark.parametrize("capture", CAPTURES, ids="-".join)
def test_the_upgrade_keeps_the_members_on_their_identity(capture: tuple[str, str]) -> None:
    plan = upgrade(capture)
    olds = {r.name: r for r in plan.before.resources}
    members = [r for r in plan.after.resources if r.type in MEMBER_TEMPLATES and "etcd" in r.name]
    assert members, "no member template declared"
    for template in members:
        field = MEMBER_TEMPLATES[template.type]
        old_identity = plain(olds[template.name].inputs)[field]
        assert plain(template.inputs)[field] == old_identity, \
            f"{template.name} would run new members as {plain(template.inputs)[field]}, while the running ones keep " \
            f"{old_identity}"
    # Every identity the release had must be kept by whatever claims it now (same or update), the API servers'
    # one (cbcd4a8) included: its machines keep running as it until the group rolls.
    kept = {urn for c in plan.changes if c.op in ("same", "update")
            for urn in (c.urn, *next(r.aliases for r in plan.after.resources if r.urn == c.urn))}
    identities = [r.name for r in plan.before.resources if r.type in IDENTITY_TYPES]
    assert identities, "the capture holds no identity"
    gone = [r.name for r in plan.before.resources if r.type in IDENTITY_TYPES and r.urn not in kept]
    assert not gone, f"the members' earlier identity is deleted or replaced: {gone}\n{plan.preview()}"


@pytest.mark.parametrize("capture", CAPTURES, ids="-".join)
def test_no_delete_at_the_end_of_the_upgrade_removes_what_it_declared(capture: tuple[str, str]) -> None:
    plan = upgrade(capture)
    declared = {physical_key(r): r.name for r in plan.after.resources if physical_key(r)}
    deleted = [old for chain in plan.deletes for old, _ in chain]
    deleted += [plan.before.named(a.name) for r in plan.registrations for a in r.actions if a.kind == "delete-replaced"]
    clashes = [f"{old.name} (deleted) and {declared[physical_key(old)]}" for old in deleted
               if physical_key(old) in declared]
    assert not clashes, "the up's last deletes would remove objects it declares: " + "; ".join(clashes)
    assert len(deleted) > 0, "the upgrade deletes nothing: the capture no longer shows the shared identity"


@pytest.mark.parametrize("capture", CAPTURES, ids="-".join)
def test_the_upgrade_keeps_the_backup_bucket_and_its_policy(capture: tuple[str, str]) -> None:
    """A replaced bucket loses the history; a replaced bucket policy is deleted after its successor was put, which
    leaves the bucket with none (no TLS-only, no refusal of other writers)."""
    plan = upgrade(capture)
    kinds = ("aws:s3/bucket:Bucket", "aws:s3/bucketPolicy:BucketPolicy", "gcp:storage/bucket:Bucket")
    touched = [(c.name, c.op) for c in plan.changes if c.type in kinds and c.op in ("replace", "delete")]
    assert not touched, touched
    assert [c for c in plan.changes if c.type in kinds], "the capture declares no backup bucket"
