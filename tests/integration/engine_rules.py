"""What the Pulumi engine and its providers decide for one resource on a second `pulumi up`.

Test code only. Each rule names the source it follows, read at:
  pulumi/pulumi 1b5949891b (v3.259.0+): pkg/resource/deploy/step_generator.go (SG),
    sdk/go/common/resource/plugin/provider.go, sdk/go/common/resource/properties_path.go;
  pulumi/pulumi-command v1.2.1 (7f3eb6f3) on pulumi-go-provider v1.3.0: infer/resource.go (INFER);
  hashicorp/terraform-provider-tls d72d90e1 and terraform-provider-random ad788e23 (the upstreams
    pulumi-tls and pulumi-random bridge; pulumi-tls 5.6.2 pins a fork commit not in that mirror).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.integration.realtls import plain
from tests.program import Declared

COMMAND = "command:remote:Command"
COPY = "command:remote:CopyToRemote"

# INFER Diff: a resource with CustomUpdate replaces only when the detailed-diff key itself is a schema
# input tagged replaceOnChanges (`forceReplace(k)` looks the key up as a property name, so "triggers[0]"
# is not, "triggers" is). pulumi-command common/inputs.go and remote/copy.go tag only `triggers`; the
# Python SDK adds replace_on_changes=["triggers[*]"] (remote/command.py), so element changes replace too.
INFER_REPLACING = {COMMAND: {"triggers"}, COPY: {"triggers"}}

# Upstream schemas: inputs with a RequiresReplace plan modifier (internal/provider/resource_*.go). What is
# missing updates in place: earlyRenewalHours on certificates (Update stores the plan, the PEM stays).
BRIDGED_REPLACING = {
    "tls:index/privateKey:PrivateKey": {"algorithm", "rsaBits", "ecdsaCurve"},
    "tls:index/certRequest:CertRequest": {"privateKeyPem", "dnsNames", "ipAddresses", "uris", "subject"},
    "tls:index/selfSignedCert:SelfSignedCert": {
        "privateKeyPem", "validityPeriodHours", "allowedUses", "dnsNames", "ipAddresses", "uris", "isCaCertificate",
        "maxPathLength", "setSubjectKeyId", "setAuthorityKeyId", "subject"},
    "tls:index/locallySignedCert:LocallySignedCert": {
        "certRequestPem", "caCertPem", "caPrivateKeyPem", "validityPeriodHours", "allowedUses", "isCaCertificate",
        "maxPathLength", "setSubjectKeyId"},
    "random:index/randomBytes:RandomBytes": {"keepers", "length"},
}

# Bridged aws and gcp resources: the inputs whose upstream schema field is ForceNew (every other one updates in
# place), for the types an upgrade of the cloud identities changes. terraform-provider-google 0540ffede9
# google/services/resourcemanager/resource_google_service_account.go (Account), 2f152ea2d0
# .../resource_google_project_iam_custom_role.go (IAMCustomRole), 0262be693c
# google/services/storage/resource_storage_bucket.go (Bucket); terraform-provider-aws 02f97af85f
# internal/service/iam/role_policy.go (RolePolicy: UpdateWithoutTimeout is PutRolePolicy), 0073593e7d
# internal/service/s3/bucket_policy.go (BucketPolicy: UpdateWithoutTimeout is PutBucketPolicy; a replacement would
# delete the bucket's policy after the new one was put).
UPSTREAM_REPLACING = {
    "gcp:serviceaccount/account:Account": {"accountId", "project"},
    "gcp:projects/iAMCustomRole:IAMCustomRole": {"roleId", "project"},
    "gcp:storage/bucket:Bucket": {"name", "location", "project", "enableObjectRetention"},
    "aws:iam/rolePolicy:RolePolicy": {"name", "namePrefix", "role"},
    "aws:s3/bucketPolicy:BucketPolicy": {"bucket"},
}
BRIDGED_REPLACING |= UPSTREAM_REPLACING

PathKey = str | int
_SEGMENT = re.compile(r'\["((?:[^"\\]|\\.)*)"\]|\[(\d+|\*)\]|\.?([^.\[\]]+)')


def parse_path(text: str) -> tuple[PathKey, ...]:
    """`a.b[0]["x-y"]` -> ("a", "b", 0, "x-y"); `*` stays a wildcard (properties_path.go)."""
    path: list[PathKey] = []
    for quoted, index, name in _SEGMENT.findall(text):
        path.append(quoted.replace('\\"', '"') if quoted else int(index) if index.isdigit() else index or name)
    return tuple(path)


def format_path(path: Iterable[PathKey]) -> str:
    """PropertyPath.String(): dotted names, [i] indexes, ["quoted"] keys that are not identifiers."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z0-9_]+", key):
            out += f".{key}" if out else key
        else:
            out += '["' + key.replace('"', '\\"') + '"]'
    return out


def path_contains(pattern: tuple[PathKey, ...], path: tuple[PathKey, ...]) -> bool:
    """PropertyPath.Contains: `pattern` is a prefix of `path`; "*" matches any key or index."""
    return len(path) >= len(pattern) and all(p == "*" or p == q for p, q in zip(pattern, path, strict=False))


def _same_leaf(old: Any, new: Any) -> bool:
    if hasattr(old, "__dict__") and hasattr(new, "__dict__"):  # assets and archives: value equality
        return type(old) is type(new) and vars(old) == vars(new)
    return old == new


def detailed_diff(old: Any, new: Any, prefix: tuple[PathKey, ...] = ()) -> dict[tuple[PathKey, ...], str]:
    """Changed paths -> "+", "-" or "~", as plugin.NewDetailedDiffFromObjectDiff reports them.

    A null and a missing property are equal (PropertyMap.DeepEquals); lists diff per index.
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: dict[tuple[PathKey, ...], str] = {}
        for key in sorted({*old, *new}):
            before, after = old.get(key), new.get(key)
            if before is None and after is not None:
                out[(*prefix, key)] = "+"
            elif before is not None and after is None:
                out[(*prefix, key)] = "-"
            elif before is not None:
                out |= detailed_diff(before, after, (*prefix, key))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = {}
        for i in range(max(len(old), len(new))):
            if i >= len(old):
                out[(*prefix, i)] = "+"
            elif i >= len(new):
                out[(*prefix, i)] = "-"
            else:
                out |= detailed_diff(old[i], new[i], (*prefix, i))
        return out
    return {} if _same_leaf(old, new) else {prefix: "~"}


def with_ignored_changes(old_inputs: dict[str, Any], new_inputs: dict[str, Any],
                         ignore_changes: Iterable[str]) -> dict[str, Any]:
    """SG processIgnoreChanges: put the old value back at every ignored path (the update runs with it)."""
    result = dict(new_inputs)
    for text in ignore_changes:
        path = parse_path(text)
        old_parent, new_parent = _walk(old_inputs, path[:-1]), _walk(result, path[:-1], copy=True)
        if isinstance(old_parent, (dict, list)) and isinstance(new_parent, (dict, list)):
            try:
                new_parent[path[-1]] = old_parent[path[-1]]  # type: ignore[index]
            except (KeyError, IndexError):
                continue  # SG: "cannot ignore changes in added or removed elements"
    return result


def _walk(value: Any, path: tuple[PathKey, ...], copy: bool = False) -> Any:
    for key in path:
        try:
            child = value[key]
        except (KeyError, IndexError, TypeError):
            return None
        if copy:
            child = dict(child) if isinstance(child, dict) else list(child) if isinstance(child, list) else child
            value[key] = child
        value = child
    return value


def provider_forces_replace(declared: Declared, path: tuple[PathKey, ...]) -> bool:
    """Whether the resource's own provider asks for a replacement on a change at `path`."""
    if not declared.custom:
        return False  # SG diff: a component has no provider; a change is an update of state only
    if declared.type in INFER_REPLACING:
        return format_path(path) in INFER_REPLACING[declared.type]
    if declared.type in BRIDGED_REPLACING:
        return path[0] in BRIDGED_REPLACING[declared.type]
    return True  # NOT FROM A SOURCE: other aws and gcp types are assumed to replace on any change


def forces_replace(declared: Declared, path: tuple[PathKey, ...]) -> bool:
    """Provider diff, then SG applyReplaceOnChanges with the resource's replace_on_changes paths."""
    patterns = [parse_path(p) for p in declared.replace_on_changes]
    return provider_forces_replace(declared, path) or any(path_contains(p, path) for p in patterns)


def trigger_replaces(old: Any, new: Any) -> bool:
    """SG shouldTriggerReplace: no trigger on either side means no replacement."""
    old, new = plain(old), plain(new)
    return old is not None and new is not None and old != new


@dataclass(frozen=True)
class Decision:
    """What the engine does with one registered resource, and why."""

    op: str  # "create" | "same" | "update" | "replace"
    paths: dict[str, str] = field(default_factory=dict)  # changed input path -> "+", "-", "~"
    replaced_by: tuple[str, ...] = ()  # the paths or options that force the replacement
    delete_before_replace: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)  # what the provider gets (ignore_changes applied)


def decide(old: Declared | None, new: Declared, replaced: set[str]) -> Decision:
    """SG generateStepsFromDiff / diff / continueStepsFromDiff for one resource, in their order."""
    if old is None:
        return Decision("create", inputs=new.inputs)
    inputs = with_ignored_changes(old.inputs, new.inputs, new.ignore_changes)
    changed = detailed_diff(plain(old.inputs), plain(inputs))
    paths = {format_path(p): kind for p, kind in changed.items()}
    reasons = _forced(old, new, replaced) or tuple(format_path(p) for p in changed if forces_replace(new, p))
    if reasons:
        # SG: the provider may ask for delete-before-replace; the option, when set, overrides it. Neither
        # pulumi-command nor the bridged tls/random providers ask for it (INFER "TODO: how should we set this").
        return Decision("replace", paths, reasons, bool(new.delete_before_replace), inputs)
    return Decision("update" if changed else "same", paths, inputs=inputs)


def _forced(old: Declared, new: Declared, replaced: set[str]) -> tuple[str, ...]:
    """Replacements the engine decides before asking the provider (SG generateStepsFromDiff, diff)."""
    if trigger_replaces(old.replacement_trigger, new.replacement_trigger):
        return ("replacement_trigger",)
    if any(urn in replaced for urn in new.replace_with):
        return ("replaceWith",)
    if new.deleted_with and new.deleted_with in replaced:
        return ("deletedWith",)
    return ()


def replaced_with_unknowns(declared: Declared, replace_set: set[str]) -> bool:
    """SG calculateDependentReplacements.requiresReplacement, for a delete-before-replace root.

    Inputs fed by a resource in `replace_set` become unknown; the dependent goes too if the provider
    (or replace_on_changes) would replace on that whole property changing.
    """
    if not declared.custom:
        return False
    if declared.deleted_with and declared.deleted_with in replace_set:
        return True
    unknown = [key for key, urns in declared.property_dependencies.items() if replace_set.intersection(urns)]
    return any(forces_replace(declared, (key,)) for key in unknown)
