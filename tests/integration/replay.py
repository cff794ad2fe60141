"""Replays the bare-metal commands the program declared, over SSH, onto local test hosts.

Test code only: the product has no engine of its own. This runs what `pulumi up` would
run for each `remote.CopyToRemote` and `remote.Command`, in registration order (which
follows the declared dependencies), with the declared stdin; `delete` steps in reverse.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.sandbox import Sandbox
from tests.integration.realtls import plain
from tests.program import Program

COMMAND = "command:remote:Command"
COPY = "command:remote:CopyToRemote"


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


@dataclass
class Replay:
    sandbox: Sandbox
    steps: list[Step]
    timings: dict[str, float] = field(default_factory=dict)

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

    def create(self, steps: list[Step] | None = None) -> None:
        for step in steps if steps is not None else self.steps:
            started = time.monotonic()
            if step.type == COPY:
                self._copy(step)
            elif step.create:
                self._run(step, step.create, step.stdin)
            self.timings[step.name] = time.monotonic() - started

    def delete(self, steps: list[Step] | None = None) -> None:
        for step in reversed(steps if steps is not None else self.steps):
            if step.type == COMMAND and step.delete:
                self._run(step, step.delete, None)

    def _run(self, step: Step, command: str, stdin: bytes | None) -> None:
        result = self.sandbox.ssh(self.host_of(step.address), command, input=stdin, timeout=300, check=False)
        if result.returncode != 0:
            raise AssertionError(
                f"step {step.name} failed ({result.returncode}): {command}\n"
                f"stdout: {result.stdout.decode()[-2000:]}\nstderr: {result.stderr.decode()[-2000:]}")

    def _copy(self, step: Step) -> None:
        """CopyToRemote semantics: a directory source lands inside an existing remote directory."""
        source = Path(step.inputs["source"].path)
        remote = step.inputs["remotePath"]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(str(source), arcname=source.name)
        target = shlex.quote(remote)
        command = (f"if [ -d {target} ]; then tar -x -C {target}; "
                   f"else d=$(mktemp -d) && tar -x -C \"$d\" && mv \"$d/{source.name}\" {target}; fi")
        self._run(step, command, buffer.getvalue())

