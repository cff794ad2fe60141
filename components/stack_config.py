"""Reads the stack's config through Pulumi and validates it before anything is declared.

A `ConfigError` becomes one `pulumi.RunError`: Pulumi prints its message alone (no
traceback), and since nothing was declared yet, nothing is created.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi.runtime

from components.config import TOP_LEVEL_KEYS, ClusterConfig, ConfigError
from components.validation import load, ssh_key_file

PROJECT = "resilient-control-plane"


def raw_stack_config() -> dict[str, Any]:
    """Every set key of the project namespace. Secret values are plaintext only while being
    validated: the model keeps them as SecretStr and the program wraps them as secrets."""
    raw: dict[str, Any] = {}
    for key in TOP_LEVEL_KEYS:
        value = pulumi.runtime.get_config(f"{PROJECT}:{key}")
        if value is None:
            continue
        # Objects and lists arrive JSON-encoded; strings stay strings ("1.36" is no float).
        raw[key] = json.loads(value) if value[:1] in "{[" else value
    return raw


def read_stack_config() -> ClusterConfig:
    """The validated config, and the key file the program will read: a missing one is one config error, not a
    traceback halfway through declaring."""
    try:
        cfg = load(raw_stack_config())
        ssh_key_file(cfg)
    except ConfigError as error:
        raise pulumi.RunError(str(error)) from None
    return cfg
