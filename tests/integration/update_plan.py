"""Plans a second `pulumi up` from two captured programs, by the engine's rules (test code only).

    after = rerun_program(config, before)      # the program again, outputs kept where the engine keeps them
    plan = plan_update(before, after)
    print(plan.preview())
    replay.run(plan)                            # tests/integration/replay.py

Order, as the engine runs it (pulumi/pulumi 1b5949891b, pkg/resource/deploy):
- Phase 1, registrations: a resource registers only once its parent, depends_on and input resources
  have registered and their steps finished (Python SDK runtime/resource.py prepare_resource awaits their
  URNs, which resolve when RegisterResource returns; step_executor.go continueExecuteStep calls
  stepComplete only after the step applied). Its step (create, update, or replacement create) then runs;
  independent ones run in parallel (at most --parallel, 4 x GOMAXPROCS by default: cmd up.go).
  A delete-before-replace runs its deletes first in the same chain (step_generator.go).
- Phase 2, deletes: after every registration (deployment_executor.go Execute -> performPostSteps), the
  removed resources and the old copies of create-before-delete replacements, in antichains of the OLD
  dependency graph, dependents first (step_generator.go GenerateDeletes, ScheduleDeletes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.integration.engine_rules import COMMAND, COPY, Decision, decide, replaced_with_unknowns
from tests.integration.realtls import plain
from tests.program import Declared, Mocks, Program, RecordingMonitor, run_program

SYMBOLS = {"create": "+", "update": "~", "replace": "+-", "delete": "-"}


@dataclass(frozen=True)
class Action:
    """One provider call: what it runs on a host (command None: nothing reaches a host)."""

    name: str
    kind: str  # "create" | "update" | "create-replacement" | "delete" | "delete-replaced"
    address: str | None = None
    command: str | None = None
    stdin: str | None = None
    copy: dict[str, Any] | None = None  # CopyToRemote inputs when the step copies
    why_not: str = ""  # why a step reaches no host (retain_on_delete, deleted_with, no delete command)


@dataclass(frozen=True)
class Change:
    urn: str
    type: str
    name: str
    op: str  # "same" | "create" | "update" | "replace" | "delete"
    paths: dict[str, str] = field(default_factory=dict)
    replaced_by: tuple[str, ...] = ()
    delete_before_replace: bool = False


@dataclass(frozen=True)
class Registration:
    """A resource of the new program: what its registration waits for and the steps it runs, in order."""

    urn: str
    name: str
    after: frozenset[str]
    actions: tuple[Action, ...] = ()


@dataclass
class UpdatePlan:
    before: Program
    after: Program
    changes: list[Change]  # registration order, then the deletes of removed resources
    registrations: list[Registration]  # phase 1, in registration order
    deletes: list[list[tuple[Declared, Action]]]  # phase 2: antichains, each run in parallel, in this order

    def named(self, op: str) -> list[str]:
        return [c.name for c in self.changes if c.op == op]

    def change(self, name: str) -> Change:
        (match,) = [c for c in self.changes if c.name == name]
        return match

    def waits_for(self, name: str) -> set[str]:
        """Every resource whose registration (and step) `name` waits for, transitively."""
        by_urn = {r.urn: r for r in self.registrations}
        todo, seen = [next(r for r in self.registrations if r.name == name).urn], set[str]()
        while todo:
            for urn in by_urn[todo.pop()].after:
                if urn in by_urn and urn not in seen:
                    seen.add(urn)
                    todo.append(urn)
        return {by_urn[u].name for u in seen}

    def dependencies_of(self, urn: str) -> set[str]:
        """Transitive dependencies in the old and the new graph (what a failed step's deletes must spare)."""
        graphs = [self.before.by_urn(), self.after.by_urn()]
        todo, seen = [urn], set[str]()
        while todo:
            current = todo.pop()
            for graph in (g for g in graphs if current in g):
                found = (_graph_edges(graph[current]) | {graph[current].parent}) - seen - {""}
                seen |= found
                todo += found
        return seen

    def counts(self) -> Counter[str]:
        return Counter(c.op for c in self.changes)

    def preview(self) -> str:
        """Like `pulumi preview --diff`'s summary: one line per change, then the counts."""
        lines = [_line(c) for c in self.changes if c.op != "same"]
        counts = self.counts()
        summary = [f"{counts[op]} to {op}" for op in ("create", "update", "replace", "delete") if counts[op]]
        lines.append("Resources: " + ", ".join([*summary, f"{counts['same']} unchanged"]))
        return "\n".join(lines)


def _display_type(token: str) -> str:
    """tls:index/privateKey:PrivateKey -> tls:index:PrivateKey, as the CLI shows types."""
    package, module, name = token.split(":")
    return f"{package}:{module.split('/')[0]}:{name}"


def _line(change: Change) -> str:
    diff = ", ".join(f"{kind}{path}" for path, kind in change.paths.items())
    info = f"[diff: {diff}]" if diff else ""
    if change.op == "replace":
        info += f" replaced by {', '.join(change.replaced_by)}"
        info += " (delete before replace)" if change.delete_before_replace else ""
    return f"{SYMBOLS[change.op]:<3}{_display_type(change.type):<44} {change.name:<44} {change.op:<8} {info}".rstrip()


def host_action(declared: Declared, kind: str, decision: Decision | None = None) -> Action:
    """What pulumi-command v1.2.1 runs for a step (remote/commandController.go, copyController.go).

    Create runs `create`; Update runs the NEW `update`, else the new `create`; Delete runs the STORED
    `delete` over the stored connection, with the stored stdin (commandOutputs.go run pipes Stdin on
    every call). CopyToRemote copies on create, on update only if the source or remote path changed,
    and has no Delete. Other types reach no host.
    """
    inputs = (decision.inputs if decision else None) or declared.inputs
    plain_inputs = plain(inputs)
    address = (plain_inputs.get("connection") or {}).get("host")
    if declared.type == COPY:
        copies = kind in ("create", "create-replacement") or (kind == "update" and decision is not None and any(
            p.startswith(("source", "remotePath")) for p in decision.paths))
        why_not = "CopyToRemote has no Delete" if kind.startswith("delete") else "source and remotePath unchanged"
        return Action(declared.name, kind, address, copy=plain_inputs if copies else None,
                      why_not="" if copies else why_not)
    if declared.type != COMMAND:
        return Action(declared.name, kind, why_not="not a host command")
    if kind.startswith("delete"):
        command = plain_inputs.get("delete")
    elif kind == "update":
        command = plain_inputs.get("update") or plain_inputs.get("create")
    else:
        command = plain_inputs.get("create")
    return Action(declared.name, kind, address, command, plain_inputs.get("stdin"),
                  why_not="" if command else f"no {kind.split('-')[0]} command")


class Planner:
    """Steps for each resource as it registers, with the state the engine keeps between them."""

    def __init__(self, before: Program) -> None:
        self.before = before
        self.olds = before.by_urn()
        self.aliased: dict[str, str] = {}  # old URN -> the new URN that claimed it (SG sg.aliased)
        self.replaced: set[str] = set()  # step_generator.go sg.replaces
        self.deleted_early: set[str] = set()  # deleted by a delete-before-replace chain
        self.registered: list[Registration] = []
        self.changes: list[Change] = []

    def old_of(self, new: Declared) -> Declared | None:
        """SG getOldResource: the old state under the new URN first, then under each alias in order; an alias
        that matched is remembered, so that the old resource is not deleted at the end (SG isOperatedOn)."""
        if new.urn in self.olds:
            return self.olds[new.urn]
        for alias in new.aliases:
            if alias in self.olds:
                claimed = self.aliased.get(alias, new.urn)
                assert claimed == new.urn, f"{alias} claimed by {claimed} and {new.urn}"  # SG: an error
                self.aliased[alias] = new.urn
                return self.olds[alias]
        return None

    def register(self, new: Declared) -> Decision:
        old = self.old_of(new)
        if new.urn in self.deleted_early and old is not None:  # SG "Case 1: recreating"
            decision = Decision("replace", replaced_by=("delete-before-replace dependency",), inputs=new.inputs)
        else:
            decision = decide(old, new, self.replaced)
        actions: list[Action] = []
        if decision.op == "replace":
            self.replaced.add(new.urn)
            if old is not None and old.urn != new.urn:
                self.replaced.add(old.urn)  # an aliased replacement deletes the old state, under its old URN
            if decision.delete_before_replace and new.urn not in self.deleted_early:
                actions += self._delete_first(old)
            actions.append(host_action(new, "create-replacement", decision))
        elif decision.op in ("create", "update"):
            actions.append(host_action(new, decision.op, decision))
        after = frozenset((_graph_edges(new) | {new.parent}) - {""})  # prepare_resource awaits each URN
        self.registered.append(Registration(new.urn, new.name, after, tuple(actions)))
        self.changes.append(Change(new.urn, new.type, new.name, decision.op, decision.paths, decision.replaced_by,
                                   decision.delete_before_replace))
        return decision

    def _delete_first(self, old: Declared | None) -> list[Action]:
        """SG continueStepsFromDiff, delete-before-replace: dependents that would be replaced, then the old copy.

        Dependents come from the old graph (graph.DependingOn), skipping what already registered.
        """
        assert old is not None
        done = {r.urn for r in self.registered}
        dependents, depending, replace_set = [], {old.urn}, {old.urn}
        for candidate in self.before.resources[self.before.resources.index(old) + 1:]:
            if candidate.urn in done or not depending.intersection(_graph_edges(candidate)):
                continue
            depending.add(candidate.urn)
            if replaced_with_unknowns(candidate, replace_set):
                dependents.append(candidate)
                replace_set.add(candidate.urn)
        chain = [*reversed(dependents), old]
        self.deleted_early.update(d.urn for d in chain)
        return [_delete(d, "delete-replaced", self.deleted_early) for d in chain]

    def finish(self, after: Program) -> UpdatePlan:
        """Phase 2: GenerateDeletes, then ScheduleDeletes on the old graph."""
        kept = {r.urn for r in after.resources} | set(self.aliased)
        gone = [o for o in self.before.resources if o.urn not in kept]
        self.changes += [Change(o.urn, o.type, o.name, "delete") for o in gone]
        removed = [o for o in gone if o.urn not in self.deleted_early]
        replaced_old = [o for o in self.before.resources if o.urn in self.replaced and o.urn not in self.deleted_early]
        condemned = [(o, "delete") for o in removed] + [(o, "delete-replaced") for o in replaced_old]
        deleting = {o.urn for o, _ in condemned} | self.deleted_early  # SG sg.deletes
        steps = [(o, _delete(o, kind, deleting)) for o, kind in condemned]
        return UpdatePlan(self.before, after, self.changes, self.registered, schedule_deletes(steps))


def _graph_edges(declared: Declared) -> set[str]:
    """State.GetAllDependencies without the parent: dependencies, inputs, deleted_with, replace_with."""
    inputs = {u for urns in declared.property_dependencies.values() for u in urns}
    return {*declared.dependencies, *inputs, declared.deleted_with, *declared.replace_with} - {""}


def _delete(old: Declared, kind: str, deleting: set[str]) -> Action:
    """step.go DeleteStep.Apply: retain_on_delete and a deleted_with resource going too skip the provider."""
    if old.retain_on_delete:
        return Action(old.name, kind, why_not="retain_on_delete")
    if old.deleted_with in deleting:
        return Action(old.name, kind, why_not=f"deleted with {old.deleted_with.split('::')[-1]}")
    return host_action(old, kind)


def schedule_deletes(steps: list[tuple[Declared, Action]]) -> list[list[tuple[Declared, Action]]]:
    """SG ScheduleDeletes: peel off resources none of whose dependencies (or parent) is condemned; reverse."""
    condemned = list(steps)
    antichains = []
    while condemned:
        urns = {old.urn for old, _ in condemned}
        chain = [s for s in condemned if not urns.intersection(_graph_edges(s[0]) | {s[0].parent})]
        assert chain, "a dependency cycle among deleted resources"
        picked = {old.urn for old, _ in chain}
        condemned = [s for s in condemned if s[0].urn not in picked]
        antichains.append(chain)
    return antichains[::-1]


def plan_update(before: Program, after: Program) -> UpdatePlan:
    """What a `pulumi up` of `after` does to a stack whose state is `before`."""
    planner = Planner(before)
    for new in after.resources:
        planner.register(new)
    return planner.finish(after)


class CarryingMonitor(RecordingMonitor):
    """A second run's monitor: resources the engine leaves alone keep the first run's outputs.

    A same step returns the old state; an update keeps the computed outputs (tls certificates keep their
    PEM: UseStateForUnknown) with the new inputs; creates and replacements get new outputs.
    """

    def __init__(self, mocks: Mocks, previous: Program) -> None:
        super().__init__(mocks)
        self.previous = previous
        self.planner = Planner(previous)

    def kept_outputs(self, declared: Declared) -> dict[str, Any] | None:
        old = self.planner.old_of(declared)
        decision = self.planner.register(declared)
        if old is None or decision.op not in ("same", "update"):
            return None
        outputs = self.previous.outputs[old.name]
        if decision.op == "same":
            return outputs
        return dict(decision.inputs) | {k: v for k, v in outputs.items() if k not in old.inputs}


def rerun_program(config: dict[str, Any], previous: Program, stack: str = "test", mocks: type[Mocks] = Mocks,
                  secret_keys: tuple[str, ...] = ()) -> Program:
    """The program again for `config`, on a stack whose state is `previous`."""
    return run_program(config, stack, mocks, secret_keys, monitor=lambda m: CarryingMonitor(m, previous),
                       generation=previous.generation + 1)
