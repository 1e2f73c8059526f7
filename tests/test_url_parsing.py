"""Only unet_dist/storage/ parses URLs: everything else holds a ``storage.Location``.

An AST scan of every other module for the shapes URL parsing takes: ``urllib.parse`` (urlsplit,
urlparse, ...), a string with ``://`` tested against or split out of a value (``"://" in x``,
``x.partition("://")``, ``x.startswith("s3://")``) and a scheme prefix tested with
``startswith``/``endswith`` (``x.startswith(("s3:", "gs:"))``).

Allowed, because they are MLflow's URIs, which MLflow resolves itself and which never name a
storage location of ours:
- tracking URIs, in ``unet_dist/tracking/__init__.py`` (is it a local store? where is the server's host and
  port for the reachability check?) and ``unet_dist/tracking_store.py`` (the default store, the
  config check of a configured URI), and nowhere else;
- MLflow model URIs (``runs:/``, ``models:/``), wherever a model is loaded.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import unet_dist

ROOT = Path(unet_dist.__file__).parent
STORAGE = ROOT / "storage"
PARSERS = {"urlsplit", "urlparse", "urljoin", "urldefrag", "urlunsplit", "urlunparse", "parse_qs", "parse_qsl"}
STRING_TESTS = {"startswith", "endswith", "partition", "rpartition", "split", "rsplit", "find", "rfind", "index",
                "rindex", "removeprefix", "removesuffix", "replace", "count"}
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MLFLOW_MODEL_URIS = {"runs:/", "models:/"}
TRACKING_URIS = {"http://", "https://", "sqlite:", "sqlite:///", "file:", "databricks", "://"}
ALLOWED = {"tracking/__init__.py": TRACKING_URIS | {"urllib.parse", "urlsplit"}, "tracking_store.py": TRACKING_URIS}


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def _url_like(text: str, method: str | None) -> bool:
    return "://" in text or (method in ("startswith", "endswith", "removeprefix") and bool(SCHEME.match(text)))


def url_parsing(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """(line, what) for each place in ``source`` that parses a URL."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module == "urllib.parse":
            found.append((node.lineno, "urllib.parse"))
        elif isinstance(node, ast.Import) and any(a.name == "urllib.parse" for a in node.names):
            found.append((node.lineno, "urllib.parse"))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in PARSERS:
                found.append((node.lineno, name))
            elif name in STRING_TESTS and isinstance(fn, ast.Attribute):
                found += [(node.lineno, s) for arg in node.args for s in _strings(arg) if _url_like(s, name)]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            found += [(node.lineno, s) for s in _strings(node.left) if "://" in s]
    return found


def test_the_scan_finds_each_shape_of_url_parsing():
    snippet = '''
from urllib.parse import urlsplit
a = url.startswith("s3://")
b = url.startswith(("s3:", "gs:"))
c = "://" in url
d = url.partition("://")
e = urlsplit(url).netloc
f = url.split("://", 1)
ok = name.startswith("checkpoint_step-") or f"s3://{bucket}/{key}" or url == "x"
'''
    assert sorted(line for line, _ in url_parsing(snippet)) == [2, 3, 4, 4, 5, 6, 7, 8]


def test_no_module_outside_the_storage_package_parses_a_url():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if STORAGE in path.parents:
            continue
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(rel, set()) | MLFLOW_MODEL_URIS
        offenders += [f"unet_dist/{rel}:{line}: {what}" for line, what in url_parsing(path.read_text(), str(path))
                      if what not in allowed]
    assert not offenders, "URL parsing outside unet_dist/storage/ (use storage.location):\n" + "\n".join(offenders)
