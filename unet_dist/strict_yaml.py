"""YAML as our config and sweep files need it: ``yaml.safe_load`` that refuses a key given twice
(PyYAML keeps the last one silently, so a second ``train:`` section would drop the first) and
names the line and column of a syntax error.
"""
from __future__ import annotations

from typing import Any

import yaml

from unet_dist.errors import UnetDistError


class DuplicateKey(UnetDistError):
    """A key given twice in one mapping."""


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse duplicate keys."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # merge keys (<<) first, as SafeLoader does
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key (a list): SafeLoader's own error says so
            break
        if first is not None:
            raise DuplicateKey(f"line {line}: key {key!r} is given twice (lines {first} and {line})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse(text: str, origin: str) -> Any:
    """The YAML document in ``text``; errors are one line starting with ``origin``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as e:
        raise DuplicateKey(f"{origin}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(str(x) for x in (e.context, e.problem) if x)
        raise UnetDistError(f"{origin}: {where}not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise UnetDistError(f"{origin}: not valid YAML ({str(e).splitlines()[0]})") from None
