"""What `pulumi up` would print besides the plan: no warning for any shipped stack.

The providers warn through the engine when a declared resource type is deprecated; that notice is what this checks,
which lets pyproject.toml ignore the Python DeprecationWarnings the providers raise merely as their modules load.
"""

from __future__ import annotations

import pytest

from tests.conftest import ALL_STACKS


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_the_program_logs_no_warning_and_declares_no_deprecated_resource(declared, stack: str) -> None:
    program = declared(stack)
    assert program.resources, "nothing declared"
    assert program.engine_warnings == [], f"{stack}: {program.engine_warnings}"
