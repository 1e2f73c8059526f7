"""The docs say what the code does: every command they show uses flags its entry point has and a
config that loads, every config key they name exists, every test they cite exists, and the facts
below (the default MLflow store, Ray token auth) match the scripts.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from test_input_fuzz import ENTRIES, call, flags_of
from unet_dist import tracking_store
from unet_dist.config import Config, flatten, load_config
from unet_dist.errors import UnetDistError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KEYS = set(flatten(Config()))
SECTIONS = {k.split(".")[0] for k in KEYS}


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def commands(text: str, prefix: str) -> list[str]:
    """Each command starting at ``prefix`` in the text: up to the end of its line (backslash
    continuations joined), its code span, or a table cell, shell comments and pipes cut."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for m in re.finditer(re.escape(prefix), text):
        rest = re.split(r"[`|\n#;]|&&|\s>\s", text[m.start():], maxsplit=1)[0]
        out.append(rest.strip())
    return out


PLACEHOLDER = re.compile(r"[<>$…{}]|\.\.\.|^[A-Z]+$|\[")


def config_args(tokens: list[str]) -> tuple[str | None, list[str]] | None:
    """(--config, [--set ...]) from a command's tokens, or None when a value is a placeholder."""
    config, sets, i = None, [], 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("--config", "--set") and i + 1 < len(tokens):
            value = tokens[i + 1]
            if PLACEHOLDER.search(value):
                return None
            if t == "--config":
                config = value
            else:
                sets.append(value)
            i += 2
            continue
        if "=" in t and t.split("=")[0].split(".")[0] in SECTIONS:  # a jobs/ script's KEY=VALUE
            if PLACEHOLDER.search(t):
                return None
            sets.append(t)
        i += 1
    return config, sets


def entry_point_commands() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for cmd in commands(doc.read_text(), "python -m unet_dist."):
            m = re.match(r"python -m unet_dist\.(\w+)\b(?![<.])", cmd)
            if m:  # not a pattern such as `python -m unet_dist.<stage>`
                found.append((doc_id(doc), m.group(1), cmd))
    return found


def test_the_docs_show_commands_of_every_entry_point():
    assert set(ENTRIES) <= {m for _, m, _ in entry_point_commands()}


@pytest.mark.parametrize("doc, module, cmd", entry_point_commands(), ids=lambda x: x if len(x) < 60 else x[:57] + "...")
def test_every_documented_command_uses_flags_its_entry_point_has_and_a_config_that_loads(doc, module, cmd):
    if module not in ENTRIES:  # a helper module run with -m (e.g. unet_dist.distributed)
        assert (REPO / "unet_dist" / f"{module}.py").is_file() or (REPO / "unet_dist" / module).is_dir(), cmd
        return
    try:
        tokens = shlex.split(cmd)[3:]
    except ValueError:
        tokens = cmd.split()[3:]
    known = {flag for flag, _ in flags_of(module)}
    used = {t.strip("[]").split("=")[0] for t in tokens if t.strip("[]").startswith("--")}
    assert used <= known, f"{doc}: `{cmd}` uses {sorted(used - known)}, not flags of python -m unet_dist.{module}"
    parsed = config_args(tokens)
    if parsed is not None and "--config" in known:
        config, sets = parsed
        try:
            load_config(REPO / config if config else None, sets)
        except UnetDistError as e:
            pytest.fail(f"{doc}: `{cmd}`: {e}")


def test_the_readme_command_table_lists_only_flags_of_each_command():
    for row in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*`python -m unet_dist\.(\w+)[^`]*`\s*\|", row)
        if not m:
            continue
        known = {flag for flag, _ in flags_of(m.group(1))}
        listed = set(re.findall(r"`(--[a-z-]+)", row))
        assert listed <= known, f"README.md: {m.group(1)} lists {sorted(listed - known)}"


def job_script_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for cmd in commands(doc.read_text(), "jobs/"):
            if re.match(r"jobs/\w+\.sh\b", cmd):
                found.append((doc_id(doc), cmd))
    return found


@pytest.mark.parametrize("doc, cmd", job_script_commands())
def test_every_documented_jobs_script_exists_and_its_key_values_load_with_its_config(doc, cmd):
    script = re.match(r"jobs/(\w+\.sh)", cmd).group(1)
    path = REPO / "jobs" / script
    assert path.is_file(), f"{doc}: `{cmd}`: no jobs/{script}"
    parsed = config_args(cmd.split()[1:])
    if parsed is None or script == "lib.sh":
        return
    default = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', path.read_text())
    config = default.group(1) if default else None
    line_config = re.search(r"CONFIG=(\S+)\s+(?:\S+=\S+\s+)*jobs/" + re.escape(script), next(
        (line for line in (REPO / doc).read_text().splitlines() if cmd.split()[0] in line), ""))
    if line_config:
        config = line_config.group(1)
    try:
        load_config(REPO / config if config else None, parsed[1])
    except UnetDistError as e:
        pytest.fail(f"{doc}: `{cmd}`: {e}")


KEY_IN_TEXT = re.compile(r"(?<![\w./-])(" + "|".join(sorted(SECTIONS)) + r")\.([a-z_]+)\b(?![.(/\w-])")
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "db", "sh", "txt", "tar", "pt", "png", "jpg"}


def test_every_config_key_the_docs_name_exists():
    unknown = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            if "error:" in line:  # examples of refused input name wrong keys on purpose
                continue
            for m in KEY_IN_TEXT.finditer(line):
                if m.group(2) not in FILE_SUFFIXES and m.group(0) not in KEYS:
                    unknown.append(f"{doc_id(doc)}: {m.group(0)}")
    assert not unknown, "docs name config keys that do not exist: " + ", ".join(unknown)


def test_every_test_the_docs_cite_exists():
    missing = []
    for doc in DOCS:
        for m in re.finditer(r"tests/[\w/]+\.py(?:::\w+)?", doc.read_text()):
            path, _, name = m.group(0).partition("::")
            if not (REPO / path).is_file() or (name and f"def {name}(" not in (REPO / path).read_text()):
                missing.append(f"{doc_id(doc)}: {m.group(0)}")
    assert not missing, "docs cite tests that do not exist: " + ", ".join(missing)


def test_serving_doc_names_the_default_store_that_training_and_predict_use():
    text = (REPO / "docs" / "serving.md").read_text()
    assert f"sqlite:///$PWD/{tracking_store.LOCAL_STORE}/mlflow.db" in text
    assert tracking_store.default_uri().endswith(f"{tracking_store.LOCAL_STORE}/mlflow.db")


def test_submit_without_a_ray_token_refuses_before_contacting_the_cluster_as_cluster_md_says(tmp_path):
    """docs/cluster.md: RAY_AUTH_MODE defaults to token and, with no token, the script refuses."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHON=sys.executable, RAY_ADDRESS="http://127.0.0.1:9")
    proc = subprocess.run(["bash", str(REPO / "jobs" / "submit_ray.sh")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: RAY_AUTH_TOKEN: no Ray token"), proc.stderr
    assert "`RAY_AUTH_MODE` defaults to\n`token`" in (REPO / "docs" / "cluster.md").read_text()


def test_the_configuration_doc_is_the_one_help_points_to():
    out = call("train", ["--help"]).stdout
    assert "docs/configuration.md" in out and (REPO / "docs" / "configuration.md").is_file()
