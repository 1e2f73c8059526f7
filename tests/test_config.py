"""Configuration: typed dataclasses from YAML and --set, with errors that name the key and the file."""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from unet_dist.config import Config, flatten, load_config
from unet_dist.errors import UnetDistError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 50\n  crop: [32, 48]\nmodel:\n  width: 8\n")
    cfg = load_config(f, ["train.steps=70", "train.lr=1", "data.resize=null", "mlflow.run_name=x"])
    assert cfg.train.steps == 70 and cfg.train.crop == [32, 48] and cfg.model.width == 8
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.resize is None and cfg.mlflow.run_name == "x"
    assert cfg.model.depth == Config().model.depth


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stepz: 5\n")
    with pytest.raises(UnetDistError, match=r"bad\.yaml: unknown key 'train\.stepz'"):
        load_config(f)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: many\n")
    with pytest.raises(UnetDistError, match=r"bad\.yaml: key 'train\.steps' expects int, got 'many'"):
        load_config(f)
    with pytest.raises(UnetDistError, match=r"--set train\.use_gpu: key 'train\.use_gpu' expects bool"):
        load_config(None, ["train.use_gpu=3"])


def test_choice_keys_reject_values_outside_their_set():
    with pytest.raises(UnetDistError, match=r"'model\.padding' must be one of same\|valid"):
        load_config(None, ["model.padding=full"])


def test_section_must_be_a_mapping_and_file_must_exist(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: 3\n")
    with pytest.raises(UnetDistError, match="expects a mapping"):
        load_config(f)
    with pytest.raises(UnetDistError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    for f in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        load_config(f)


def _config_doc_tool():
    spec = importlib.util.spec_from_file_location("gen_config_doc", REPO / "scripts" / "gen_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_equals_the_table_generated_from_the_dataclasses():
    tool = _config_doc_tool()
    doc = tool.DOC.read_text()
    assert tool.render(doc) == doc, "docs/configuration.md is stale: run python scripts/gen_config_doc.py"


def test_configuration_doc_gives_every_key_its_default_and_a_meaning():
    rows = {key: (default, meaning) for key, _, _, default, meaning in _config_doc_tool().rows()}
    assert list(rows) == list(flatten(Config()))
    assert rows["train.steps"][0] == str(Config().train.steps) and rows["data.resize"][0] == "[128, 128]"
    assert not [k for k, (_, meaning) in rows.items() if not meaning], "a Config field lacks its comment"


# `python -m unet_dist.<name>` -> (the module holding its main, whether it reads the Config with
# --config FILE / --set key=value); the others take only their own flags, as the README says.
ENTRY_POINTS = {"preprocess": ("unet_dist.preprocess", True), "train": ("unet_dist.train.cli", True),
                "demo": ("unet_dist.demo", True), "evaluate": ("unet_dist.evaluate", False),
                "predict": ("unet_dist.predict", False), "synth": ("unet_dist.synth.cli", False),
                "tune": ("unet_dist.tune", True)}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_has_help_and_says_whether_it_takes_config(name, capsys):
    module, takes_config = ENTRY_POINTS[name]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"python -m unet_dist.{name}" in out
    assert ("--config" in out and "--set" in out) == takes_config, out


def test_unknown_key_on_command_line_is_one_line_error():
    out = subprocess.run([sys.executable, "-m", "unet_dist.train", "--set", "train.bogus=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "unknown key 'train.bogus'" in out.stderr


def test_demo_yaml_spells_out_exactly_the_builtin_defaults():
    assert load_config(REPO / "jobs" / "configs" / "demo.yaml") == Config()
