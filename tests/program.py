"""Runs the real Pulumi program (`__main__.py`) under Pulumi's mocks for one stack file.

Tests see exactly what `pulumi up` would declare: every resource with its inputs, in
registration order (which follows the declared dependencies). Mocked providers return
plausible outputs; `Mocks` subclasses can return more (real certificates, for the
integration tests that replay the declared commands on real hosts).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import runpy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi.runtime
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.proto import resource_pb2
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components.stack_file import PROJECT, project_config

ROOT = Path(__file__).resolve().parents[1]
STACKS = sorted(ROOT.glob("stacks/Pulumi.*.yaml"))


def stack_name(path: Path) -> str:
    return path.name.removeprefix("Pulumi.").removesuffix(".yaml")


stack_config = project_config


@dataclass
class Declared:
    """One registered resource: its inputs and the options the engine plans an update with."""

    type: str
    name: str
    inputs: dict[str, Any]
    urn: str = ""
    parent: str = ""
    custom: bool = True
    dependencies: list[str] = field(default_factory=list)  # depends_on and every input's resources (URNs)
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)  # input name -> URNs
    replace_on_changes: list[str] = field(default_factory=list)  # property paths, incl. the SDK's own
    ignore_changes: list[str] = field(default_factory=list)
    delete_before_replace: bool | None = None  # None: not set, the provider decides
    retain_on_delete: bool = False
    deleted_with: str = ""
    replace_with: list[str] = field(default_factory=list)
    replacement_trigger: Any = None
    protect: bool = False
    aliases: list[str] = field(default_factory=list)  # earlier URNs of this resource (the `aliases` option)

    @property
    def explicit_dependencies(self) -> list[str]:
        """`depends_on` as far as the request tells it: dependencies that no input carries."""
        carried = {u for urns in self.property_dependencies.values() for u in urns}
        return [u for u in self.dependencies if u not in carried]


@dataclass
class Program:
    resources: list[Declared] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # resource name -> its outputs
    generation: int = 0  # how many runs came before this one (see `Mocks`)
    engine_warnings: list[str] = field(default_factory=list)  # what `pulumi up` would print as warnings

    def by_urn(self) -> dict[str, Declared]:
        return {r.urn: r for r in self.resources}

    def of_type(self, type_token: str) -> list[Declared]:
        return [r for r in self.resources if r.type == type_token]

    def named(self, name: str) -> Declared:
        matches = [r for r in self.resources if r.name == name]
        assert len(matches) == 1, f"expected one resource named {name}, found {len(matches)}"
        return matches[0]


def _pem(kind: str, name: str) -> str:
    """A recognisable fake PEM: tests can tell which resource a key or cert came from."""
    return f"-----BEGIN {kind}-----\n{name}\n-----END {kind}-----\n"


class Mocks(pulumi_mocks.Mocks):
    """Echo inputs as outputs, plus the outputs that real providers compute.

    A later run (`generation` > 0) issues different keys and certificates, as a provider would
    for a resource it creates again; the first run's values stay what they always were.
    """

    def __init__(self, program: Program, generation: int = 0) -> None:
        self.program = program
        self.generation = generation

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.program.resources.append(Declared(args.typ, args.name, dict(args.inputs), custom=bool(args.custom)))
        outputs = dict(args.inputs) | self.computed_outputs(args)
        self.program.outputs[args.name] = outputs
        return f"{args.name}-id", outputs

    def computed_outputs(self, args: pulumi_mocks.MockResourceArgs) -> dict[str, Any]:
        name, typ = args.name + (f" (run {self.generation + 1})" if self.generation else ""), args.typ
        if typ == "tls:index/privateKey:PrivateKey":
            return {"privateKeyPem": _pem("PRIVATE KEY", name), "privateKeyOpenssh": _pem("OPENSSH PRIVATE KEY", name),
                    "publicKeyPem": _pem("PUBLIC KEY", name),
                    "publicKeyOpenssh": f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5{name.replace('-', '')} {name}\n"}
        if typ in ("tls:index/selfSignedCert:SelfSignedCert", "tls:index/locallySignedCert:LocallySignedCert"):
            return {"certPem": _pem("CERTIFICATE", name)}
        if typ == "tls:index/certRequest:CertRequest":
            return {"certRequestPem": _pem("CERTIFICATE REQUEST", name)}
        if typ == "random:index/randomBytes:RandomBytes" and self.generation:
            raw = hashlib.sha256(name.encode()).digest()
            return {"base64": base64.b64encode(raw).decode(), "hex": raw.hex()}
        if typ == "random:index/randomBytes:RandomBytes":
            return {"base64": "c2VjcmV0LWVuY3J5cHRpb24ta2V5LW9mLTMyLWJ5dGVzIQ==", "hex": "00" * 32}
        if typ == "aws:s3/bucket:Bucket":  # AWS names a bucket from its prefix
            return {"bucket": f"{args.inputs.get('bucketPrefix', name)}0001", "arn": f"arn:aws:s3:::{name}"}
        autonamed = args.name + (f"-run{self.generation + 1}" if self.generation else "")  # a valid cloud name
        return {"id": f"{name}-id", "name": args.inputs.get("name", autonamed), "selfLink": f"https://mock/{name}",
                "arn": f"arn:aws:mock:::{name}", "address": "10.0.0.10", "dnsName": f"{name}.mock",
                "email": f"{name}@mock.iam.gserviceaccount.com", "privateIp": "10.0.0.10",
                "publicIp": "198.51.100.10", "latestVersion": 1}

    def call(self, args: pulumi_mocks.MockCallArgs) -> dict[str, Any]:
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "x86_64"}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": "123456789012", "arn": "arn:aws:iam::123456789012:root", "userId": "x"}
        if args.token == "aws:index/getPartition:getPartition":
            return {"partition": "aws", "dnsSuffix": "amazonaws.com"}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args.get("id"), "vpcId": "vpc-0123456789abcdef0", "cidrBlock": "10.30.0.0/20"}
        if args.token == "aws:ec2/getVpc:getVpc":
            return {"id": args.args.get("id"), "cidrBlock": "10.30.0.0/16"}
        if args.token == "gcp:compute/getImage:getImage":
            return {"selfLink": "projects/debian-cloud/global/images/debian-12-bookworm-v20260101", "name": "debian-12"}
        return {}


STACK_TYPE = "pulumi:pulumi:Stack"


def _trigger(request: Any) -> Any:
    """The replacement trigger as a plain value (None when the resource has none)."""
    if not request.HasField("replacement_trigger"):
        return None
    return json_format.MessageToDict(request.replacement_trigger)


def _alias_urns(request: Any, urn: str) -> list[str]:
    """The request's aliases as URNs, as step_generator.go collapseAliasToUrn makes them: what a spec leaves out is
    the resource's own (name, type, parent, project, stack). Provider SDKs alias earlier type tokens themselves."""
    prefix, project, qualified, name = urn.split("::", 3)
    parent_type, _, own_type = qualified.rpartition("$")
    found = []
    for alias in request.aliases:
        if alias.urn:
            found.append(alias.urn)
            continue
        spec = alias.spec
        parent = parent_type
        if spec.parentUrn:
            parent = spec.parentUrn.split("::")[2]
        if spec.noParent or parent.startswith("pulumi:pulumi:Stack"):
            parent = ""
        stack = f"urn:pulumi:{spec.stack}" if spec.stack else prefix
        found.append(f"{stack}::{spec.project or project}::{parent + '$' if parent else ''}{spec.type or own_type}"
                     f"::{spec.name or name}")
    return found


def _record_options(declared: Declared, request: Any, urn: str) -> None:
    declared.urn, declared.parent = urn, request.parent
    declared.dependencies = list(request.dependencies)
    declared.property_dependencies = {k: list(v.urns) for k, v in request.propertyDependencies.items()}
    declared.replace_on_changes = list(request.replaceOnChanges)
    declared.ignore_changes = list(request.ignoreChanges)
    declared.delete_before_replace = request.deleteBeforeReplace if request.deleteBeforeReplaceDefined else None
    declared.retain_on_delete = request.retainOnDelete
    declared.deleted_with = request.deletedWith
    declared.replace_with = list(request.replace_with)
    declared.replacement_trigger = _trigger(request)
    declared.protect = request.protect
    declared.aliases = _alias_urns(request, urn)


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The mock monitor, keeping each resource's URN, dependencies and options.

    `MockResourceArgs` carries none of them, yet they decide what a second `pulumi up` does.
    Registrations arrive from the SDK's worker threads; one at a time keeps each request with
    the `Declared` its mocks call appended.
    """

    def __init__(self, mocks: Mocks) -> None:
        super().__init__(mocks)
        self.program = mocks.program
        self._lock = threading.Lock()

    def RegisterResource(self, request: Any) -> Any:
        if request.type == STACK_TYPE:
            return super().RegisterResource(request)
        with self._lock:
            start = len(self.program.resources)
            response = super().RegisterResource(request)
            (declared,) = self.program.resources[start:]
            _record_options(declared, request, response.urn)
            kept = self.kept_outputs(declared)
            if kept is None:
                return response
            self.program.outputs[declared.name] = kept
            state = _sync_await(rpc.serialize_properties(kept, {}))
            # The engine keeps the old ID too (the physical object is the same one).
            return resource_pb2.RegisterResourceResponse(urn=response.urn, id=kept.get("id", response.id), object=state)

    def kept_outputs(self, declared: Declared) -> dict[str, Any] | None:
        """Outputs the engine keeps from an earlier state for this resource; None: the mocks' own."""
        return None


class _EngineWarnings(logging.Handler):
    """The mock engine's log at WARNING and above: the program's own `pulumi.log.warn` and a provider's notice that a
    declared resource type is deprecated, which `pulumi up` would print."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def engine_log(program: Program) -> logging.Logger:
    """The mock engine's logger, writing into `program` (runs in one process are one after another)."""
    logger = logging.getLogger(f"{__name__}.engine")
    logger.propagate = False
    logger.handlers = [_EngineWarnings(program.engine_warnings)]
    return logger


def run_program(config: dict[str, Any], stack: str = "test", mocks: type[Mocks] = Mocks,
                secret_keys: tuple[str, ...] = (),
                monitor: Callable[[Mocks], RecordingMonitor] = RecordingMonitor,
                generation: int = 0) -> Program:
    """Declare the whole program for `config` under mocks and return what it declared."""
    program = Program(generation=generation)
    instance = mocks(program, generation=generation)
    pulumi_settings.set_root_resource(None)  # type: ignore[arg-type]
    pulumi.runtime.set_mocks(instance, project=PROJECT, stack=stack, preview=False, monitor=monitor(instance),
                             logger=engine_log(program))
    encoded = {f"{PROJECT}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    pulumi.runtime.set_all_config(encoded, [f"{PROJECT}:{k}" for k in secret_keys])
    _sync_await(run_pulumi_func(lambda: runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")))
    return program
