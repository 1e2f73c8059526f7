"""Configuration: typed dataclasses from YAML and --set, with errors that name the key and the file."""
import importlib
import importlib.util
import os
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
ENTRY_POINTS = {"preprocess": ("unet_dist.preprocess.cli", True), "train": ("unet_dist.train.cli", True),
                "demo": ("unet_dist.demo", True), "evaluate": ("unet_dist.evaluate", False),
                "predict": ("unet_dist.predict", False), "synth": ("unet_dist.synth.cli", False),
                "tune": ("unet_dist.tune", True), "batch_predict": ("unet_dist.batch_predict", False),
                "export": ("unet_dist.export", False)}


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


# ------------------------------------------------------------------ the YAML itself
def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_both_lines(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("train:\n  steps: 50\nmodel:\n  width: 8\ntrain:\n  lr: 0.1\n")
    with pytest.raises(UnetDistError, match=r"^.*twice\.yaml: line 5: key 'train' is given twice \(lines 1 and 5\)$"):
        load_config(f)
    f.write_text("train:\n  steps: 50\n  steps: 60\n")
    with pytest.raises(UnetDistError, match=r"line 3: key 'steps' is given twice \(lines 2 and 3\)"):
        load_config(f)
    with pytest.raises(UnetDistError, match=r"^--set train\.crop: line 1: key 'a' is given twice"):
        load_config(None, ["train.crop={a: 1, a: 2}"])


def test_a_yaml_syntax_error_names_line_and_column(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  steps: 50\n  crop: [64, 64\nmodel:\n  width: 8\n")
    with pytest.raises(UnetDistError, match=r"broken\.yaml: line 4, column 6: not valid YAML \(while parsing a flow sequence: expected"):
        load_config(f)
    f.write_text("train:\n\tsteps: 5\n")
    with pytest.raises(UnetDistError, match=r"broken\.yaml: line 2, column 1: not valid YAML"):
        load_config(f)


def test_sweep_files_are_read_by_the_same_strict_loader(tmp_path):
    from unet_dist.sweep import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text("name: a\nspace:\n  train.lr: {choice: [0.1]}\nname: b\n")
    with pytest.raises(UnetDistError, match=r"s\.yaml: line 4: key 'name' is given twice \(lines 1 and 4\)"):
        load_sweep(f)
    f.write_text("name: a\nspace:\n  train.steps: {choice: [100, 0]}\n")
    with pytest.raises(UnetDistError, match=r"s\.yaml: space 'train\.steps': key 'train\.steps' must be >= 1, got 0"):
        load_sweep(f)


def test_a_sweep_whose_space_breaks_a_rule_with_the_base_config_is_refused(tmp_path):
    from unet_dist.sweep import check_against_base, load_sweep

    f = tmp_path / "s.yaml"
    f.write_text("name: a\nspace:\n  train.steps: {choice: [400, 60]}\n  train.log_every: {grid: [5, 100]}\n"
                 "asha: {grace_period: 20}\n")
    with pytest.raises(UnetDistError, match=r"s\.yaml: space 'train\.log_every' value 100: key 'train\.log_every' "
                                            r"must be <= train\.steps, got train\.log_every=100, train\.steps=60"):
        check_against_base(load_sweep(f), load_config(None, ["train.eval_every=20"]))


# ------------------------------------------------------------------ constraints and rules
@pytest.mark.parametrize("sets, message", [
    (["train.steps=-5"], r"--set train\.steps: key 'train\.steps' must be >= 1, got -5"),
    (["train.log_every=0"], r"key 'train\.log_every' must be >= 1, got 0"),
    (["train.batch_size=0"], r"key 'train\.batch_size' must be >= 1, got 0"),
    (["train.workers=0"], r"key 'train\.workers' must be >= 1, got 0"),
    (["train.lr=-1"], r"key 'train\.lr' must be > 0, got -1"),
    (["train.lr=.inf"], r"key 'train\.lr' expects a finite float, got inf"),
    (["shards.jpeg_quality=0"], r"key 'shards\.jpeg_quality' must be in \[1, 100\], got 0"),
    (["train.scale=[2, 1]"], r"key 'train\.scale' must be \[low, high\] with low <= high"),
    (["train.crop=[64]"], r"key 'train\.crop' must be \[height, width\], two items"),
    (["train.run_name=a/b"], r"key 'train\.run_name' must be letters, digits"),
    (["train.steps=5"], r"--set train\.steps: key 'train\.log_every' must be <= train\.steps, got "
                        r"train\.log_every=10, train\.steps=5"),
    (["train.log_every=1", "train.steps=20"], r"--set train\.steps: key 'train\.warmup_steps' must be < train\.steps"),
    (["model.padding=valid", "model.depth=5", "train.crop=[2,2]"],
     r"key 'train\.crop' must be at least the smallest output of a valid U-Net of model\.depth when model\.padding "
     r"is valid \(4 at depth 5\)"),
])
def test_ranges_and_rules_are_one_error_naming_the_key_and_the_place_to_edit(sets, message):
    with pytest.raises(UnetDistError, match=message):
        load_config(None, sets)


def test_the_rules_name_the_file_when_the_file_broke_them(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\n  log_every: 1\n")
    with pytest.raises(UnetDistError, match=r"c\.yaml: key 'train\.warmup_steps' must be < train\.steps"):
        load_config(f)
    assert load_config(f, ["train.warmup_steps=2"]).train.warmup_steps == 2


def test_a_text_key_takes_the_text_as_typed():
    assert load_config(None, ["train.run_name=2024", "mlflow.experiment= x "]).train.run_name == "2024"
    assert load_config(None, ["mlflow.run_name='quoted'"]).mlflow.run_name == "quoted"


def test_a_valid_padding_crop_is_the_largest_the_network_maps_exactly():
    from unet_dist.train.parts import label_crop
    from unet_dist.unet_geometry import output_size

    cfg = load_config(None, ["model.padding=valid", "model.depth=4", "train.crop=[130,131]"])
    h, w = label_crop(cfg)
    assert h <= 130 and w <= 131 and output_size(h + 88, 4) == h and output_size(w + 88, 4) == w


# ------------------------------------------------------------------ entry points
def test_every_console_script_runs_its_help():
    """pyproject.toml's scripts, as installed: each imports and prints its help (unet-synth pointed
    at a function that did not exist)."""
    import shutil
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"unet-{n.replace('_', '-')}" for n in ENTRY_POINTS}
    for name, target in scripts.items():
        path = shutil.which(name, path=str(Path(sys.executable).parent))
        assert path, f"{name} is not installed next to {sys.executable}: run make setup"
        proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m unet_dist."), (name, proc.stderr)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_shows_the_whole_description_defaults_and_where_the_keys_are(name, capsys):
    module = importlib.import_module(ENTRY_POINTS[name][0])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    description = module.__doc__.strip().split("\n\n")
    assert len(description) > 1 and "``" not in out and ":mod:" not in out
    assert description[-1].splitlines()[-1].replace("``", "`").strip() in out, "the whole docstring, to its last line"
    assert "docs/configuration.md" in out
    if name in ("evaluate", "predict", "synth"):
        assert "(default: " in out


@pytest.mark.parametrize("name, argv", [
    ("train", ["--set", "train.steps=0"]), ("tune", ["--search", "nope.yaml"]), ("demo", ["--set", "x.y=1"]),
    ("evaluate", ["--model", "nope", "--shards", "x"]), ("predict", ["--model", "nope", "--input", "x", "--out", "y"]),
    ("synth", ["--out", "x", "--processes", "-1"]),
])
def test_a_bad_input_is_reported_before_torch_ray_or_mlflow_is_imported(name, argv):
    code = (f"import sys, importlib\nm = importlib.import_module({ENTRY_POINTS[name][0]!r})\n"
            f"try:\n    m.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 2\n"
            "print(sorted(x for x in ('torch', 'ray', 'mlflow') if x in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


# ------------------------------------------------------------------ one MLflow store, nothing written on failure
def test_training_evaluate_and_predict_resolve_the_same_default_store(tmp_path, monkeypatch):
    from unet_dist import model_source, tracking_store
    from unet_dist.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(Config())
    assert uri == tracking_store.resolve() == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    with pytest.raises(UnetDistError, match=r"--model models:/m/1: MLFLOW_TRACKING_URI is not set and there is no "
                                            r"MLflow store at .*runs/mlflow/mlflow\.db"):
        model_source.check("models:/m/1")
    assert not list(tmp_path.iterdir()), "resolving the store wrote nothing"
    tracking_store.prepare(uri)
    (tmp_path / "runs" / "mlflow" / "mlflow.db").write_bytes(b"")
    model_source.check("models:/m/1")
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # pinned for MLflow: it would look in ./mlflow.db


def test_a_train_that_fails_its_checks_leaves_nothing_behind(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unet_dist.train", "--set", f"shards.dir={tmp_path / 'none'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert "shards directory not found" in proc.stderr
    assert not list(tmp_path.iterdir()), "no runs/mlflow (or anything else) in the current folder"
