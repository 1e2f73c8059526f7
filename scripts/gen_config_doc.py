"""Write the configuration table of docs/configuration.md from the ``Config`` dataclasses.

    .venv/bin/python scripts/gen_config_doc.py           # rewrite the table in place
    .venv/bin/python scripts/gen_config_doc.py --check   # exit 1 if the committed table is stale

Keys, types, accepted values and defaults come from the dataclasses (each field's ``Annotated``
constraint and the cross-field ``RULES``); each meaning is the comment at the end of the field's
line in unet_dist/config.py (read with ast + tokenize), so the code is the one source.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unet_dist import config, constraints  # noqa: E402

DOC = REPO / "docs" / "configuration.md"
START, END = "<!-- config-table:start (scripts/gen_config_doc.py) -->", "<!-- config-table:end -->"


def field_comments() -> dict[tuple[str, str], str]:
    """(dataclass name, field name) -> the comment on the field's line."""
    source = Path(config.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[(node.name, item.target.id)] = comments.get(item.lineno, "")
    return out


def type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "str"  # its values are in the "accepted" column
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    return repr(value)


def accepted(section: str, cls: type, name: str) -> str:
    """What the key accepts: its declared constraint (unet_dist/constraints.py) and the rules of
    unet_dist/config.py that name it first."""
    parts = [str(c) for c in constraints.field_constraints(cls)[name]]
    if not parts:  # the type says it all
        tp = typing.get_type_hints(cls)[name]
        parts = ["one of " + ", ".join(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal
                 else {bool: "true or false", str: "any text"}.get(tp, "any")]
    parts += [rule.text for rule in config.RULES if rule.keys[0] == f"{section}.{name}"]
    return "; ".join(parts)


def rows() -> list[tuple[str, str, str, str, str]]:
    """(key, type, accepted values, default, meaning) for every key, in declaration order."""
    comments, out = field_comments(), []
    root = config.Config()
    for section in dataclasses.fields(root):
        obj = getattr(root, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            out.append((f"{section.name}.{f.name}", type_name(hints[f.name]),
                        accepted(section.name, type(obj), f.name), default_text(getattr(obj, f.name)),
                        comments[(type(obj).__name__, f.name)]))
    return out


def table() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | accepted | default | meaning |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {cell(t)} | {cell(a)} | `{cell(d)}` | {cell(m)} |" for k, t, a, d, m in rows()]
    return "\n".join(lines)


def render(doc: str) -> str:
    """``doc`` with the text between the markers replaced by the current table."""
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not up to date")
    args = p.parse_args()
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            sys.exit(f"{DOC}: configuration table is stale; run python scripts/gen_config_doc.py")
        return
    DOC.write_text(fresh)


if __name__ == "__main__":
    main()
