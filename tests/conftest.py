"""Shared fixtures: the Pulumi program run under mocks, once per stack and test session."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.program import ROOT, Program, run_program, stack_config, stack_name

_RUNS: dict[tuple[str, str], Program] = {}


@pytest.fixture(scope="session")
def throwaway_ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `local` stack names an SSH key file; under mocks any readable key will do."""
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def stack_for_tests(path: Path, key: Path) -> dict[str, Any]:
    cfg = stack_config(path)
    if "baremetal" in cfg and "sshPrivateKeyPath" in cfg["baremetal"]:
        cfg["baremetal"]["sshPrivateKeyPath"] = str(key)
    return cfg


@pytest.fixture(scope="session")
def declared(throwaway_ssh_key: Path):
    """`declared("local")`: what the program declares for a shipped stack (cached per session)."""
    def run(stack: str, **overrides: Any) -> Program:
        key = (stack, repr(sorted(overrides.items())))
        if key not in _RUNS:
            cfg = stack_for_tests(ROOT / "stacks" / f"Pulumi.{stack}.yaml", throwaway_ssh_key)
            cfg.update(overrides)
            _RUNS[key] = run_program(cfg, stack=stack)
        return _RUNS[key]
    return run


ALL_STACKS = [stack_name(p) for p in sorted((ROOT / "stacks").glob("Pulumi.*.yaml"))]
