"""Replays the bare-metal commands the program declared, over SSH, onto local test hosts.

Test code only: the product has no engine of its own. `first_up()` is the first `pulumi up`: every
`remote.CopyToRemote` and `remote.Command` created, planned from an empty state and run as `run(plan)`
runs it. `create(steps)` runs steps' create commands again one by one, in registration order (which follows
the declared dependencies), with the declared stdin; `delete()` runs the `delete` steps in reverse
(a `pulumi destroy`). `run(plan)` runs a planned `pulumi up` (tests/integration/update_plan.py)
the way the engine schedules it: registrations as their dependencies finish, in parallel; then the
deletes, antichain by antichain. What happens after a failure follows deployment_executor.go and
step_executor.go (pulumi/pulumi 1b5949891b):
- default: the first failed step cancels the deployment; steps already running finish, nothing else
  starts (not even independent steps), and the delete phase never runs;
- continue_on_error (`pulumi up --continue-on-error`): only what depends on a failed step is skipped
  (handleSingleEvent: doesStepDependOn); the delete phase runs but spares every resource a failed
  step transitively depends on (performPostSteps: erroredDeps).
Host keys are checked as pulumi-command v1.2.1 checks them (remote/connection.go): a connection with a
`hostKey` accepts that key only, and only that key's type (ssh StrictHostKeyChecking=yes against a
known_hosts made of it), so a host presenting another key is refused before any stdin is sent; a
connection without one accepts any key.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.sandbox import Sandbox
from tests.integration.engine_rules import COMMAND, COPY
from tests.integration.realtls import plain
from tests.integration.update_plan import Action, Registration, UpdatePlan, plan_update
from tests.program import Program


@dataclass
class Step:
    name: str
    type: str
    address: str
    inputs: dict

    @property
    def create(self) -> str | None:
        return self.inputs.get("create")

    @property
    def delete(self) -> str | None:
        return self.inputs.get("delete")

    @property
    def stdin(self) -> bytes | None:
        value = self.inputs.get("stdin")
        return value.encode() if value is not None else None

    @property
    def host_key(self) -> str | None:
        return self.inputs["connection"].get("hostKey")


@contextmanager
def verified(address: str, host_key: str | None) -> Iterator[list[str]]:
    """ssh options that check the host as pulumi-command does: only `host_key`, only its type; none: any key."""
    if host_key is None:
        yield []
        return
    with tempfile.NamedTemporaryFile("w", prefix="kcp-known-hosts-") as known_hosts:
        known_hosts.write(f"{address} {host_key}\n")
        known_hosts.flush()
        yield ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts.name}",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlgorithms={host_key.split()[0]}"]


@dataclass(frozen=True)
class StepResult:
    name: str
    kind: str
    ok: bool
    started: float = 0.0  # seconds since the run began
    seconds: float = 0.0
    command: str | None = None
    returncode: int | None = None
    output: str = ""  # the tail of stdout and stderr, or the error
    skipped: str = ""  # why it never ran


@dataclass
class UpdateRun:
    """What `Replay.run` did, step by step, with timings."""

    results: list[StepResult] = field(default_factory=list)
    stopped: str = ""  # why the run stopped early, if it did

    @property
    def ok(self) -> bool:
        return not self.stopped and all(r.ok for r in self.results)

    @property
    def failed(self) -> list[StepResult]:
        return [r for r in self.results if not r.ok and not r.skipped]

    @property
    def timings(self) -> dict[str, float]:
        return {f"{r.name}:{r.kind}": r.seconds for r in self.results if not r.skipped}

    def of(self, name: str) -> list[StepResult]:
        return [r for r in self.results if r.name == name]

    def report(self) -> str:
        lines = [f"{r.started:7.1f}s {r.seconds:6.1f}s {'ok ' if r.ok else 'ERR'} {r.kind:<18} {r.name}"
                 + (f"  skipped: {r.skipped}" if r.skipped else "")
                 + (f"\n{r.output}" if not r.ok and not r.skipped else "") for r in self.results]
        return "\n".join([*lines, f"stopped: {self.stopped}" if self.stopped else "completed"])


@dataclass
class Replay:
    sandbox: Sandbox
    steps: list[Step]

    @classmethod
    def of(cls, sandbox: Sandbox, program: Program) -> Replay:
        steps = [Step(r.name, r.type, plain(r.inputs)["connection"]["host"], plain(r.inputs))
                 for r in program.resources if r.type in (COMMAND, COPY)]
        return cls(sandbox, steps)

    def host_of(self, address: str) -> str:
        for name, addr in self.sandbox.hosts.items():
            if addr == address:
                return name
        raise KeyError(f"no test host has address {address}")

    def for_host(self, host: str) -> list[Step]:
        return [s for s in self.steps if self.host_of(s.address) == host]

    def pin(self, host: str, host_key: str) -> None:
        """What editing the host's `hostKey` in the stack does to its steps: their connections pin the new key."""
        for step in self.for_host(host):
            step.inputs["connection"]["hostKey"] = host_key

    def first_up(self, program: Program) -> UpdateRun:
        """The first `pulumi up` of `program` onto empty hosts: independent steps in parallel, as the engine runs
        them; fails with the run's report if a step failed."""
        run = self.run(plan_update(Program(), program))
        assert run.ok, run.report()
        return run

    def create(self, steps: list[Step] | None = None) -> None:
        for step in steps if steps is not None else self.steps:
            if step.type == COPY:
                self._run(step, *_copy_command(step.inputs))
            elif step.create:
                self._run(step, step.create, step.stdin)

    def delete(self, steps: list[Step] | None = None) -> None:
        for step in reversed(steps if steps is not None else self.steps):
            if step.type == COMMAND and step.delete:
                self._run(step, step.delete, None)

    def run(self, plan: UpdatePlan, *, continue_on_error: bool = False, parallel: int | None = None,
            step_timeout: float = 300, deadline: float = 3600) -> UpdateRun:
        """Run a planned `pulumi up` on the hosts; on success the replay mirrors `plan.after`."""
        run = _PlanRun(self, plan, continue_on_error, parallel or 4 * (os.cpu_count() or 1), step_timeout,
                       time.monotonic() + deadline).execute()
        if run.ok:
            self.steps = Replay.of(self.sandbox, plan.after).steps
        return run

    def apply(self, action: Action, timeout: float, host_key: str | None = None) -> tuple[bool, int | None, str]:
        """One provider call on its host, over a connection pinned to `host_key`: (ok, exit status, output tail).
        Never raises for the step's failure."""
        if action.copy is not None:
            command, stdin = _copy_command(action.copy)
        elif action.command:
            command, stdin = action.command, (action.stdin or "").encode() or None  # empty stdin: none piped
        else:
            return True, None, action.why_not
        try:
            result = self._ssh(action.address or "", host_key, command, stdin, timeout)
        except (subprocess.TimeoutExpired, KeyError) as error:
            return False, None, str(error)
        output = f"stdout: {result.stdout.decode()[-2000:]}\nstderr: {result.stderr.decode()[-2000:]}"
        return result.returncode == 0, result.returncode, output

    def _ssh(self, address: str, host_key: str | None, command: str, stdin: bytes | None,
             timeout: float) -> subprocess.CompletedProcess[bytes]:
        host = self.host_of(address)
        with verified(address, host_key) as options:
            return self.sandbox.ssh(host, command, input=stdin, timeout=timeout, check=False, options=options)

    def _run(self, step: Step, command: str, stdin: bytes | None) -> None:
        result = self._ssh(step.address, step.host_key, command, stdin, 300)
        if result.returncode != 0:
            raise AssertionError(
                f"step {step.name} failed ({result.returncode}): {command}\n"
                f"stdout: {result.stdout.decode()[-2000:]}\nstderr: {result.stderr.decode()[-2000:]}")


def _copy_command(inputs: dict[str, Any]) -> tuple[str, bytes]:
    """CopyToRemote semantics: a directory source lands inside an existing remote directory."""
    source = Path(inputs["source"].path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(source), arcname=source.name)
    target = shlex.quote(inputs["remotePath"])
    command = (f"if [ -d {target} ]; then tar -x -C {target}; "
               f"else d=$(mktemp -d) && tar -x -C \"$d\" && mv \"$d/{source.name}\" {target}; fi")
    return command, buffer.getvalue()


class _PlanRun:
    """One execution of a plan: phase 1 (registrations), then phase 2 (deletes)."""

    def __init__(self, replay: Replay, plan: UpdatePlan, continue_on_error: bool, parallel: int,
                 step_timeout: float, deadline: float) -> None:
        self.replay, self.plan, self.continue_on_error = replay, plan, continue_on_error
        self.step_timeout, self.deadline = step_timeout, deadline
        self.pool = ThreadPoolExecutor(max_workers=parallel)
        self.start = time.monotonic()
        self.run = UpdateRun()
        self.failed: set[str] = set()  # URNs whose step failed (step_executor.go erroredSteps)
        self.skipped: set[str] = set()  # URNs skipped because they wait for a failed step
        # Deletes run over the stored connection, everything else over the new one (commandController.go).
        self.host_keys = {phase: {r.name: (plain(r.inputs).get("connection") or {}).get("hostKey")
                                  for r in program.resources if r.type in (COMMAND, COPY)}
                          for phase, program in (("before", plan.before), ("after", plan.after))}

    def execute(self) -> UpdateRun:
        try:
            self._registrations()
            self._deletes()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)  # running steps end within step_timeout
        return self.run

    def _stop(self, why: str) -> None:
        self.run.stopped = self.run.stopped or why

    def _actions(self, actions: tuple[Action, ...]) -> list[StepResult]:
        """A chain, serially; it stops at a failure or once the run stopped (step_executor.go executeChain)."""
        results = []
        for action in actions:
            if self.run.stopped:
                results.append(StepResult(action.name, action.kind, False, skipped="the run was cancelled"))
                continue
            began = time.monotonic()
            keys = self.host_keys["before" if action.kind.startswith("delete") else "after"]
            ok, status, output = self.replay.apply(action, self.step_timeout, keys.get(action.name))
            results.append(StepResult(action.name, action.kind, ok, began - self.start, time.monotonic() - began,
                                      action.command, status, output))
            if not ok:
                break
        return results

    def _skip(self, actions: tuple[Action, ...] | list[Action], why: str) -> None:
        self.run.results += [StepResult(a.name, a.kind, False, skipped=why) for a in actions]

    def _registrations(self) -> None:
        """Phase 1: each resource's chain once everything it waits for finished."""
        known = {r.urn: r.name for r in self.plan.registrations}
        waiting = {r.urn: r for r in self.plan.registrations}
        finished: set[str] = set()
        running: dict[Future[list[StepResult]], Registration] = {}
        while waiting or running:
            self._start_ready(waiting, finished, running, known)
            if not running:
                break
            done, _ = wait(running, timeout=max(0.0, self.deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:
                self._stop("deadline passed during the registrations")
                for registration in running.values():
                    self._skip(registration.actions, "still running at the deadline")
                break
            for future in done:
                registration = running.pop(future)
                results = future.result()
                self.run.results += results
                if all(r.ok for r in results) and len(results) == len(registration.actions):
                    finished.add(registration.urn)
                else:
                    self.failed.add(registration.urn)
                    if not self.continue_on_error:
                        self._stop(f"{registration.name} failed")
        for registration in waiting.values():
            self._skip(registration.actions, self.run.stopped or "waits for a failed step")

    def _start_ready(self, waiting: dict[str, Registration], finished: set[str],
                     running: dict[Future[list[StepResult]], Registration], known: dict[str, str]) -> None:
        """Start (or, without actions, finish at once) every registration whose dependencies finished."""
        progressed = True
        while progressed and not self.run.stopped:
            progressed = False
            for urn, registration in list(waiting.items()):
                needs = registration.after & known.keys()
                blocked = needs & (self.failed | self.skipped)
                if blocked and self.continue_on_error:
                    self.skipped.add(urn)
                    self._skip(registration.actions, f"depends on failed {known[min(blocked)]}")
                elif needs <= finished and registration.actions:
                    running[self.pool.submit(self._actions, registration.actions)] = registration
                elif needs <= finished:
                    finished.add(urn)
                else:
                    continue
                del waiting[urn]
                progressed = True

    def _deletes(self) -> None:
        """Phase 2: antichain after antichain, each in parallel (deployment_executor.go performPostSteps)."""
        for index, antichain in enumerate(self.plan.deletes):
            if self.run.stopped:
                self._skip([a for chain in self.plan.deletes[index:] for _, a in chain], "no delete phase: "
                           + self.run.stopped)
                return
            spared = {u for urn in self.failed for u in self.plan.dependencies_of(urn)}
            self._skip([a for old, a in antichain if old.urn in spared], "a failed step depends on it")
            todo = {self.pool.submit(self._actions, (a,)): old for old, a in antichain if old.urn not in spared}
            done, late = wait(todo, timeout=max(0.0, self.deadline - time.monotonic()))
            if late:
                self._stop("deadline passed during the deletes")
            for future in done:
                results = future.result()
                self.run.results += results
                if not all(r.ok for r in results):
                    self.failed.add(todo[future].urn)
                    if not self.continue_on_error:
                        self._stop(f"{results[-1].name} failed to delete")
