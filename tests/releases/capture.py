"""Captures what a release of the program declares for the cloud example stacks, for the upgrade tests.

Run from the root of a checkout of that release (it uses that release's own tests/program.py and mocks):

    git worktree add /tmp/release be3abab && cd /tmp/release
    .venv/bin/python /path/to/main/tests/releases/capture.py /path/to/main/tests/releases/be3abab.json.gz

Each stack is captured as written and with etcd colocated with the API servers (the other identity layout).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path.cwd()))

from tests.program import run_program, stack_config  # the release's own

STACKS = ("gce-example", "aws-example")
LARGE = 4096


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Capture name -> (stack, config)."""
    found = {}
    for stack in STACKS:
        config = stack_config(Path("stacks") / f"Pulumi.{stack}.yaml")
        found[stack] = (stack, config)
        colocated = copy.deepcopy(config)
        colocated["etcd"] = {**colocated["etcd"], "placement": "colocated"}
        found[f"{stack}-colocated"] = (stack, colocated)
    return found


def digested(value: Any) -> Any:
    """Bundles (host programs, secrets) by their sha256: any change of them is an update, whatever it is."""
    if isinstance(value, dict):
        return {k: digested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [digested(v) for v in value]
    if isinstance(value, str) and len(value) > LARGE:
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def main(out: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    captured = {}
    for name, (stack, config) in variants().items():
        program = run_program(config, stack=stack)
        captured[name] = {"stack": stack, "config": config, "generation": program.generation,
                          "resources": digested([dataclasses.asdict(r) for r in program.resources]),
                          "outputs": digested(program.outputs)}
    with gzip.open(out, "wt", encoding="utf-8") as f:
        json.dump({"release": commit, "captures": captured}, f, sort_keys=True, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
