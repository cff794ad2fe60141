"""Jinja2 environment for host file templates; undefined variables are errors, not blanks, and a value
that would break out of its line is an error, not a new directive."""

from pathlib import Path
from typing import Any

import jinja2


def _one_line(value: Any) -> Any:
    """keepalived, HAProxy and nftables have no quoting for a line break: a value with one (or any control or
    non-ASCII character) would add a directive of its own, such as a keepalived `notify_master` run as root."""
    if isinstance(value, str) and not (value.isascii() and value.isprintable()):
        raise ValueError(f"refusing to render {value!r} into a host file: printable ASCII only")
    return value


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
    finalize=_one_line,
)


def render(template: str, **values: Any) -> str:
    return _ENV.get_template(template).render(**values)
