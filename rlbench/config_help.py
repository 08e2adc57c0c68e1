"""Config documentation: every field's default and doc, from the dataclasses themselves.

Field docs are the attribute docstrings of the config dataclasses (``rlbench.config`` and each
plug-in's ``Config``); ``help_text`` turns them into ``rlbench train --help``, so they are the
single source of documentation for every option.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from functools import cache

from rlbench.config import PluginConfig, RunConfig
from rlbench.registry import ALGORITHMS, TASKS


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted name, default, doc)`` for every field of ``cls``, nested sections included."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if isinstance(value, PluginConfig):
            continue
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", json.dumps(value, default=str), docs.get(f.name, "")))
    return rows


def help_text() -> str:
    """Every config field with its default and doc: core sections, then each plug-in."""
    lines = ["Run config fields (YAML sections, or dotted.key=value overrides):", ""]

    def emit(rows: list[tuple[str, str, str]]) -> None:
        for name, default, doc in rows:
            lines.append(f"  {name} = {default}")
            lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))

    emit(describe(RunConfig))
    for section, registry in (("task", TASKS), ("algorithm", ALGORITHMS)):
        for name, plugin in registry:
            lines += ["", f"{section}.name = {name!r} (options of {registry.kind} {name!r}):"]
            prefix = f"{section}.{name}." if section == "algorithm" else f"{section}."
            emit(describe(plugin.Config, prefix))
    return "\n".join(lines)
