"""Reads a stack file (`stacks/Pulumi.<stack>.yaml`) offline, for tools that run without Pulumi.

The Pulumi program itself reads config through Pulumi (components/stack_config.py); operator
tools (report, restore) and tests read the same keys from the file with this one function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROJECT = "resilient-control-plane"


def project_config(path: Path) -> dict[str, Any]:
    """The project's keys of one stack file, prefix removed: `{"target": "gce", ...}`."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    config = data.get("config") or {}
    return {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith(f"{PROJECT}:")}
