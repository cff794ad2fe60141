"""Reads a stack file (`stacks/Pulumi.<stack>.yaml`) offline, for tools that run without Pulumi.

The Pulumi program itself reads config through Pulumi (components/stack_config.py); operator
tools (report, restore, DR drill, the preview workflow's facts) read a stack file with
`read_stack`: the same model, defaults and validation as `pulumi up`. `project_config` gives
the raw values, for tests that feed them to the program under Pulumi's mocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from components.config import ClusterConfig, ConfigError
from components.validation import load

PROJECT = "resilient-control-plane"
SECRET_PLACEHOLDER = "(secret)"


class StackFileError(Exception):
    """A stack file that is missing, not YAML, or not a valid configuration; the message names the file."""


def project_config(path: Path) -> dict[str, Any]:
    """The project's keys of one stack file, prefix removed: `{"target": "gce", ...}`."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config = data.get("config") or {}
    return {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith(f"{PROJECT}:")}


def _without_secrets(value: Any) -> Any:
    """`{secure: ...}` values are ciphertext only Pulumi can read; no offline tool needs a secret."""
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return SECRET_PLACEHOLDER
        return {k: _without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


def read_stack(path: Path) -> ClusterConfig:
    """The project's keys of one stack file, validated exactly as `pulumi up` would, with the model's
    defaults; secrets are replaced by a placeholder."""
    try:
        return load(_without_secrets(project_config(path)))
    except (ConfigError, OSError, yaml.YAMLError) as error:
        raise StackFileError(f"{path}: {error}") from None
