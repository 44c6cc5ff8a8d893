"""scripts/ablate.py: the config overrides, and a tiny grid (2 settings x 2
seeds, 2 steps of a small ResNet on the digits) whose table and JSON must
hold the numbers the runs wrote to their own metrics.jsonl."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

from cmim_jax import default_config
from cmim_jax import metric_writers
from cmim_jax.data.loaders import digits as digits_loader

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("ablate", os.path.join(_ROOT, "scripts",
                                                                      "ablate.py"))
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)


def test_override_parses_by_the_keys_type():
  config = default_config.get_config()
  for override in ["objectives=ce,kd", "cmim.weight=0.5", "cmim.class_aware=true",
                   "model.stage_sizes=(1,1,1)", "model.input_quantizer=ste_sign(clip=1.5)",
                   "batch_size=32", "data.train_split=train[:10]"]:
    ablate.apply_override(config, override)
  assert config.objectives == "ce,kd"  # A string with a comma stays a string.
  assert config.cmim.weight == 0.5 and config.cmim.class_aware is True
  assert config.model.stage_sizes == (1, 1, 1)
  assert config.model.input_quantizer == "ste_sign(clip=1.5)"
  assert config.batch_size == 32 and config.data.train_split == "train[:10]"


@pytest.mark.parametrize("override, words", [
    ("cmim.wieght=1", "no key 'cmim.wieght'"),
    ("cmmi.weight=1", "no section 'cmmi'"),
    ("cmim.weight", "not KEY=VALUE"),
    ("cmim.weight=high", "not a float"),
    ("cmim.class_aware=1", "true or false"),
    ("batch_size=0.5", "batch_size"),
])
def test_bad_override_names_the_problem(override, words):
  with pytest.raises(ValueError, match=words.replace("(", r"\(")):
    ablate.apply_override(default_config.get_config(), override)


def test_bad_grid_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="built-in ones are ce, cmim_batch"):
    ablate.main(["--settings", "ce,nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="no key 'cmim.nope'"):
    ablate.main(["--settings", "", "--setting", "mine", "cmim.nope=1", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="no held-out number"):
    ablate.main(["--settings", "ce", "--override", "data.eval_split=train", "--out",
                 str(tmp_path)])
  assert not os.listdir(tmp_path)  # Nothing was trained.


@pytest.mark.slow  # Four tiny training runs: mostly XLA compiles.
def test_tiny_grid_table_and_json_hold_the_runs_numbers(tmp_path, capsys):
  out = tmp_path / "grid"
  steps = 2
  # Cross entropy only: the script, not an objective, is under test, and CE
  # steps compile fastest. The second setting changes how often the run logs,
  # not what it computes: all four runs compile the same programs, so the
  # test session's compilation cache (conftest.py) compiles them once.
  argv = ["--settings", "ce", "--setting", "ce_log1", "objectives=ce",
          "log_every_steps=1", "--seeds", "0,1", "--steps", str(steps), "--out", str(out),
          "--override", "model.stage_sizes=(1,1,1)", "--override", "model.widths=(8,16,32)",
          "--override", "batch_size=32", "--quiet"]
  report = ablate.main(argv)
  stdout = capsys.readouterr().out
  last = json.loads(stdout.strip().splitlines()[-1])  # The last line is the JSON report.
  with open(out / "ablation.json") as f:
    assert json.load(f) == last
  assert list(last["settings"]) == ["ce", "ce_log1"]
  assert last["seeds"] == [0, 1] and last["steps"] == steps

  n_test = 1797 - digits_loader.NUM_TRAIN  # The digits' held-out 'test' split.
  for name, setting in last["settings"].items():
    accuracies = []
    for seed, run in zip([0, 1], setting["runs"]):
      assert run["seed"] == seed and run["reused"] is False
      assert run["workdir"] == os.path.join(str(out), name, f"seed{seed}")
      # The number is the run's own last evaluation, at its last step, on the test split.
      records = metric_writers.read_metrics(run["workdir"])
      evals = [r for r in records if r["split"] == "eval"]
      assert len(evals) == 1 and evals[0]["step"] == steps
      # The setting's override reached the run: it logged every step, or only the last.
      assert [r["step"] for r in records if r["split"] == "train"] == (
          [steps] if name == "ce" else list(range(1, steps + 1)))
      assert run["accuracy"] == evals[0]["accuracy"] and run["loss"] == evals[0]["loss"]
      assert run["num_examples"] == n_test
      with open(os.path.join(run["workdir"], "config.json")) as f:
        config = json.load(f)
      assert config["seed"] == seed and config["num_train_steps"] == steps
      assert config["model"]["widths"] == [8, 16, 32] and config["batch_size"] == 32
      assert config["objectives"] == "ce"
      # ablate.py caps the interval at the run's length.
      assert config["log_every_steps"] == (steps if name == "ce" else 1)
      assert config["data"]["eval_split"] == "test" and config["data"]["train_split"] == "train"
      accuracies.append(run["accuracy"])
    # The seed reaches the run: different initialisations, different held-out losses.
    assert setting["runs"][0]["loss"] != setting["runs"][1]["loss"]
    summary = setting["summary"]
    assert summary["n"] == 2
    np.testing.assert_allclose(summary["mean"], np.mean(accuracies))
    np.testing.assert_allclose(summary["std"], np.std(accuracies, ddof=1))
    assert (summary["min"], summary["max"]) == (min(accuracies), max(accuracies))
    row = next(line for line in last["table"].splitlines() if line.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2" and cells[3] == f"{100 * np.mean(accuracies):.2f}"
    assert cells[7] == " ".join(f"{100 * a:.2f}" for a in accuracies)
  assert last["table"] in stdout
  assert report["table"] == last["table"]

  # Run again: every finished run is reused, with the same numbers; a changed
  # config in the same folder is refused instead of mixing two grids.
  again = ablate.main(argv)
  for name, setting in again["settings"].items():
    assert all(r["reused"] for r in setting["runs"])
    assert [r["accuracy"] for r in setting["runs"]] == [
        r["accuracy"] for r in last["settings"][name]["runs"]]
  with pytest.raises(FileExistsError, match="another config"):
    ablate.main(argv[:-1] + ["--override", "cmim.temperature=0.2", "--quiet"])


def test_config_helper_reads_a_variant():
  config = ablate.load_config("configs/digits.py:smoke")
  assert isinstance(config, ml_collections.ConfigDict) and config.num_epochs == 2.0
  with pytest.raises(FileNotFoundError, match="not a file"):
    ablate.load_config("configs/nope.py")
