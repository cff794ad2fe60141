"""Policies for a second `pulumi up`: what it changes, in which order, and what runs on the hosts.

Plans come from tests/integration/update_plan.py, which follows the engine's and the providers' rules
(each cited there); execution uses a fake host that records every command it is given.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from components.pki import CAS
from components.render import agent
from tests.conftest import stack_for_tests
from tests.integration.engine_rules import COMMAND
from tests.integration.realtls import RealTlsMocks, plain
from tests.integration.replay import Replay
from tests.integration.update_plan import UpdatePlan, plan_update, rerun_program
from tests.program import ROOT, Declared, Program, run_program

LOCAL = ROOT / "stacks" / "Pulumi.local.yaml"
H4 = {"name": "h4", "address": "10.250.0.15", "zone": "rack-a", "roles": ["loadbalancer"]}
CERT = "tls:index/locallySignedCert:LocallySignedCert"


@pytest.fixture(scope="module")
def local(throwaway_ssh_key: Path) -> dict[str, Any]:
    return stack_for_tests(LOCAL, throwaway_ssh_key)


@pytest.fixture(scope="module")
def agent_build() -> bytes:
    return agent.agent_zipapp()


@pytest.fixture(scope="module", autouse=True)
def same_agent(agent_build: bytes) -> Iterator[None]:
    """Every `up` of this module ships one agent build: kcp_host/ may change under a running test suite."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agent, "agent_zipapp", lambda: agent_build)
        yield


@pytest.fixture(scope="module")
def before(local: dict[str, Any]) -> Program:
    """The first `up` of the shipped stack, shared by the tests below: none of them changes a `Program`."""
    return run_program(local, stack="local")


@pytest.fixture(scope="module")
def rotated(before: Program, local: dict[str, Any]) -> UpdatePlan:
    """The second `up` after `pki.rotation` is bumped."""
    return second_up(before, changed(local, pki__rotation=1))


def changed(config: dict[str, Any], **edits: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(config)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("__")
        target = cfg
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return cfg


def second_up(before: Program, config: dict[str, Any]) -> UpdatePlan:
    return plan_update(before, rerun_program(config, before, stack="local"))


def registered_actions(plan: UpdatePlan) -> list[str]:
    return [f"{a.kind} {a.name}" for r in plan.registrations for a in r.actions]


# -- the shipped `local` stack -----------------------------------------------------------------


def test_a_second_up_with_no_change_runs_nothing(before, local) -> None:
    plan = second_up(before, local)
    assert plan.counts() == {"same": len(before.resources)}, plan.preview()
    assert registered_actions(plan) == [] and plan.deletes == []
    assert plan.preview() == f"Resources: {len(before.resources)} unchanged"


def test_records_depends_on_and_input_dependencies(declared) -> None:
    program = declared("local")
    urns = {r.name: r.urn for r in program.resources}
    second = program.named("local-h2-etcd-config")
    assert urns["local-h1-etcd-config"] in second.explicit_dependencies
    assert urns["local-pki-etcd-peer-h2"] in second.property_dependencies["stdin"]
    assert program.named("local-h1-etcd-start").replace_on_changes == ["triggers[*]"]
    assert program.named("local-pki-admin-key").replacement_trigger == 0


def test_backup_interval_updates_only_the_etcd_config_commands_one_member_at_a_time(before, local) -> None:
    plan = second_up(before, changed(local, backup__intervalMinutes=30))
    members = ["local-h1-etcd-config", "local-h2-etcd-config", "local-h3-etcd-config", "local-spare1-etcd-config"]
    assert plan.named("update") == members, plan.preview()
    assert plan.named("replace") == plan.named("create") == plan.named("delete") == []
    assert all(plan.change(m).paths == {"stdin": "~"} for m in members)
    assert registered_actions(plan) == [f"update {m}" for m in members]
    assert all("etcd-rolling-restart" in a.command for r in plan.registrations for a in r.actions)
    for earlier, later in itertools.pairwise(members):
        assert earlier in plan.waits_for(later), f"{later} must wait for {earlier}"


def test_pki_rotation_reissues_every_leaf_and_updates_the_bundles_never_the_cas(before, rotated) -> None:
    plan = rotated
    leaves = {s.name for s in before.of_type(CERT)}
    expected = {n for leaf in leaves for n in (leaf, f"{leaf}-csr", f"{leaf}-key")}
    assert set(plan.named("replace")) == expected, plan.preview()
    assert all(plan.change(f"{leaf}-key").replaced_by == ("replacement_trigger",) for leaf in leaves)
    cas = {n for ca in CAS for n in (f"local-pki-{ca}", f"local-pki-{ca}-key")}
    assert cas.isdisjoint(plan.named("replace") + plan.named("update"))
    assert sorted(plan.named("update")) == sorted(
        [f"local-{h}-etcd-config" for h in ("h1", "h2", "h3", "spare1")]
        + [f"local-{h}-apiserver-config" for h in ("h1", "h2", "h3")])
    old_copies = {a.name for chain in plan.deletes for _, a in chain}
    assert old_copies == expected
    assert all(a.command is None for chain in plan.deletes for _, a in chain), "tls deletes reach no host"


def test_new_api_server_files_restart_one_api_server_after_the_other(rotated) -> None:
    """New leaf certificates reach every API server in one `pulumi up`: the engine runs the updates in the order their
    dependencies give, so each host's static pods restart only after the one before it is ready again."""
    plan = rotated
    hosts = [f"local-{h}-apiserver-config" for h in ("h1", "h2", "h3")]
    updates = [a for r in plan.registrations for a in r.actions if r.name in hosts]
    assert [a.name for a in updates] == hosts and all("static-pods-restart" in (a.command or "") for a in updates)
    for earlier, later in itertools.pairwise(hosts):
        assert earlier in plan.waits_for(later), f"{later} must wait for {earlier}"


def test_unchanged_certificates_stay_byte_identical_and_reissued_ones_change(local) -> None:
    before = run_program(local, stack="local", mocks=RealTlsMocks)
    same = rerun_program(local, before, stack="local", mocks=RealTlsMocks)
    rotated = rerun_program(changed(local, pki__rotation=1), before, stack="local", mocks=RealTlsMocks)
    for ca in CAS:
        assert same.outputs[f"local-pki-{ca}"]["certPem"] == before.outputs[f"local-pki-{ca}"]["certPem"]
        assert rotated.outputs[f"local-pki-{ca}"]["certPem"] == before.outputs[f"local-pki-{ca}"]["certPem"]
    for leaf in (r.name for r in before.of_type(CERT)):
        assert same.outputs[leaf]["certPem"] == before.outputs[leaf]["certPem"], leaf
        assert rotated.outputs[leaf]["certPem"] != before.outputs[leaf]["certPem"], leaf


def test_a_removed_host_loses_exactly_its_resources_in_the_final_phase(local) -> None:
    with_h4 = changed(local, baremetal__hosts=[*local["baremetal"]["hosts"], H4])
    before = run_program(with_h4, stack="local")
    plan = plan_update(before, rerun_program(local, before, stack="local"))
    # The shipped stack trusts on first use: the read of h4's key goes last, and deleting it runs nothing.
    h4 = ["local-h4-loadbalancer", "local-h4-firewall", "local-h4-agent", "local-h4-host-key"]
    assert sorted(plan.named("delete")) == sorted(h4), plan.preview()
    assert not any("-h4-" in a for a in registered_actions(plan))
    deletes = [(old, action) for chain in plan.deletes for old, action in chain]
    assert [a.name for _, a in deletes] == h4, "dependents go first"
    for old, action in deletes:
        assert action.address == H4["address"] and action.command == plain(old.inputs).get("delete")


def test_an_added_host_creates_its_resources(before, local) -> None:
    plan = second_up(before, changed(local, baremetal__hosts=[*local["baremetal"]["hosts"], H4]))
    assert plan.named("create") == ["local-h4-host-key", "local-h4-agent", "local-h4-firewall", "local-h4-loadbalancer"]
    assert plan.named("delete") == [] and plan.named("replace") == []
    assert "local-h4-agent" in plan.waits_for("local-h4-firewall")
    assert "local-h4-host-key" in plan.waits_for("local-h4-agent"), "trust on first use: its key is read first"


# -- rules on small hand-made graphs ------------------------------------------------------------


def command(name: str, host: str = "10.0.0.1", depends: tuple[str, ...] = (), triggers: list | None = None,
            update: str | None = None, **options: Any) -> Declared:
    inputs = {"create": f"create {name}", "delete": f"delete {name}", "update": update,
              "connection": {"host": host}, "triggers": triggers}
    return Declared(COMMAND, name, inputs, urn=f"urn:{name}", dependencies=[f"urn:{d}" for d in depends],
                    replace_on_changes=["triggers[*]"], **options)


def edited(declared: Declared, dependencies: list[str] | None = None, **inputs: Any) -> Declared:
    deps = declared.dependencies if dependencies is None else dependencies
    return Declared(**{**vars(declared), "inputs": {**declared.inputs, **inputs}, "dependencies": deps})


def test_a_triggers_change_replaces_even_with_an_update_command() -> None:
    old = command("x", triggers=[1], update="update x")
    plan = plan_update(Program([old]), Program([edited(old, triggers=[2])]))
    assert plan.change("x").op == "replace" and plan.change("x").replaced_by == ("triggers[0]",)
    assert registered_actions(plan) == ["create-replacement x"]


def test_a_command_change_updates_in_place_with_the_new_update_else_the_new_create() -> None:
    with_update, without = command("a", update="update a"), command("b")
    plan = plan_update(Program([with_update, without]),
                       Program([edited(with_update, update="update a v2"), edited(without, create="create b v2")]))
    assert [a.command for r in plan.registrations for a in r.actions] == ["update a v2", "create b v2"]


def test_create_before_delete_runs_the_old_delete_after_every_create_and_update() -> None:
    x, y = command("x", triggers=[1]), command("y", depends=("x",))
    plan = plan_update(Program([x, y]), Program([edited(x, triggers=[2]), edited(y, create="create y v2")]))
    assert registered_actions(plan) == ["create-replacement x", "update y"]
    assert [[a.command for _, a in chain] for chain in plan.deletes] == [["delete x"]]
    calls = FakeHosts().run(plan)
    assert [c for c, _, _ in calls] == ["create x", "create y v2", "delete x"]
    assert calls[2][1] >= max(end for _, _, end in calls[:2])


def test_delete_before_replace_deletes_the_old_copy_first() -> None:
    x = command("x", triggers=[1], delete_before_replace=True)
    plan = plan_update(Program([x]), Program([edited(x, triggers=[2])]))
    assert registered_actions(plan) == ["delete-replaced x", "create-replacement x"] and plan.deletes == []


def test_delete_before_replace_first_deletes_dependents_whose_replacing_inputs_it_feeds() -> None:
    x = command("x", triggers=[1], delete_before_replace=True)
    fed = Declared(**{**vars(command("fed", depends=("x",))), "property_dependencies": {"triggers": ["urn:x"]}})
    ordered = command("ordered", depends=("x",))  # depends_on only: its inputs cannot change
    plan = plan_update(Program([x, fed, ordered]), Program([edited(x, triggers=[2]), fed, ordered]))
    assert registered_actions(plan) == ["delete-replaced fed", "delete-replaced x", "create-replacement x",
                                        "create-replacement fed"]
    assert plan.change("ordered").op == "same" and plan.deletes == []


def test_deleted_with_and_retain_on_delete_skip_the_delete_command() -> None:
    parent = command("parent")
    child = command("child", depends=("parent",), deleted_with="urn:parent")
    kept = command("kept", retain_on_delete=True)
    plan = plan_update(Program([parent, child, kept]), Program([]))
    actions = {a.name: a for chain in plan.deletes for _, a in chain}
    assert actions["parent"].command == "delete parent"
    assert actions["child"].command is None and actions["child"].why_not == "deleted with urn:parent"
    assert actions["kept"].command is None and actions["kept"].why_not == "retain_on_delete"


def test_ignore_changes_keeps_the_old_value_and_replace_on_changes_replaces() -> None:
    ignoring = command("i", ignore_changes=["create"])
    strict = Declared(**{**vars(command("s")), "replace_on_changes": ["create"]})
    plan = plan_update(Program([ignoring, strict]),
                       Program([edited(ignoring, create="other"), edited(strict, create="other")]))
    assert plan.change("i").op == "same" and plan.change("s").op == "replace"


def test_a_replacement_trigger_first_set_replaces_nothing() -> None:
    old = command("x")
    plan = plan_update(Program([old]), Program([Declared(**{**vars(old), "replacement_trigger": 1})]))
    assert plan.change("x").op == "same"


def test_the_preview_reads_like_pulumi_preview_diff() -> None:
    same, updated, replaced, removed = command("same"), command("updated"), command("replaced", triggers=[1]), \
        command("removed")
    plan = plan_update(Program([same, updated, replaced, removed]),
                       Program([same, edited(updated, create="v2"), edited(replaced, triggers=[2]), command("added")]))
    lines = plan.preview().splitlines()
    assert [line.split()[:3] for line in lines[:-1]] == [
        ["~", "command:remote:Command", "updated"], ["+-", "command:remote:Command", "replaced"],
        ["+", "command:remote:Command", "added"], ["-", "command:remote:Command", "removed"]]
    assert "[diff: ~create]" in lines[0] and "replaced by triggers[0]" in lines[1]
    assert lines[-1] == "Resources: 1 to create, 1 to update, 1 to replace, 1 to delete, 1 unchanged"


def test_depends_on_chains_run_serially_while_independent_updates_run_in_parallel() -> None:
    a, b, c = command("a"), command("b", depends=("a",)), command("c", host="10.0.0.2")
    plan = plan_update(Program([a, b, c]), Program([edited(r, create=f"new {r.name}") for r in (a, b, c)]))
    assert plan.waits_for("b") == {"a"} and plan.waits_for("c") == set()
    calls = {cmd: (start, end) for cmd, start, end in FakeHosts().run(plan)}
    assert calls["new b"][0] >= calls["new a"][1], "b starts after a finished"
    assert calls["new c"][0] < calls["new a"][1], "c runs while a runs"


def test_a_failure_stops_everything_not_yet_started_and_the_delete_phase() -> None:
    a, b = command("a"), command("b", depends=("a",))
    p, q = command("p", host="10.0.0.2"), command("q", depends=("p",), host="10.0.0.2")
    plan = plan_update(Program([a, b, p, q, command("gone")]),
                       Program([edited(r, create=f"new {r.name}") for r in (a, b, p, q)]))
    hosts = FakeHosts(failing={"new a"}, slow={"new p"})
    run = Replay(hosts, []).run(plan)  # type: ignore[arg-type]
    assert not run.ok and [r.name for r in run.failed] == ["a"]
    assert sorted(cmd for cmd, _, _ in hosts.calls) == ["new a", "new p"], "running p finished; q never started"
    assert {r.name for r in run.results if r.skipped} == {"b", "q", "gone"}


def test_continue_on_error_skips_only_dependents_and_spares_what_the_failed_step_needed() -> None:
    a, b, c = command("a"), command("b", depends=("a",)), command("c", host="10.0.0.2")
    legacy, user, gone = command("legacy"), command("user", depends=("legacy",)), command("gone")
    news = [*(edited(r, create=f"new {r.name}") for r in (a, b, c)), edited(user, create="broken", dependencies=[])]
    hosts = FakeHosts(failing={"new a", "broken"})
    plan = plan_update(Program([a, b, c, legacy, user, gone]), Program(news))
    run = Replay(hosts, []).run(plan, continue_on_error=True)  # type: ignore[arg-type]
    assert sorted(cmd for cmd, _, _ in hosts.calls) == ["broken", "delete gone", "new a", "new c"]
    assert run.of("b")[0].skipped == "depends on failed a"
    assert run.of("legacy")[0].skipped == "a failed step depends on it"


class FakeHosts:
    """Stands in for the sandbox: every command takes a moment and may fail; calls are recorded."""

    def __init__(self, failing: set[str] | frozenset[str] = frozenset(), slow: set[str] | frozenset[str] = frozenset(),
                 seconds: float = 0.2) -> None:
        self.hosts = {"h1": "10.0.0.1", "h2": "10.0.0.2"}
        self.failing, self.slow, self.seconds = failing, slow, seconds
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def ssh(self, host: str, command: str, input: bytes | None = None, timeout: float = 60,
            check: bool = True, options: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
        started = time.monotonic()
        time.sleep(self.seconds * (3 if command in self.slow else 1))
        with self._lock:
            self.calls.append((command, started, time.monotonic()))
        return subprocess.CompletedProcess([host], 1 if command in self.failing else 0, b"", b"")

    def run(self, plan: UpdatePlan) -> list[tuple[str, float, float]]:
        run = Replay(self, []).run(plan)  # type: ignore[arg-type]
        assert run.ok, run.report()
        return sorted(self.calls, key=lambda call: call[1])
