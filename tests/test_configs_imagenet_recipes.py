"""The ImageNet two-step recipes: SD-BNN ResNet-18 and ReActNet-18, KD from an FP ResNet-34.

The recipe values are checked against the official code, written out here
rather than read from the configs under test; the ``,smoke`` chains run end
to end (teacher -> step 1 -> step 2 through ``config.teacher`` and
``config.init_from``) on a generated folder of 1000 tiny classes.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cmim_jax import loop, metric_writers, models, teachers, train
from configs import (imagenet, imagenet_teacher, reactnet_imagenet, s2bnn_imagenet,
                     sdbnn_imagenet)

# liuzechun/ReActNet resnet/{1_step1,2_step2}: train.py's argparse defaults
# (batch 512, lr 1e-3, 256 epochs), run.sh (weight decay 1e-5 then 0), Adam,
# LambdaLR(1 - epoch/epochs), DistributionLoss only, teacher 'resnet34'.
# pingxue-hfut/SD-BNN imagenet/birealnet.py's docstring: two stages, Adam,
# lr 1e-3 linearly to 0 after 256 epochs, batch 512, ResNet-34 teacher (no
# weight decay or loss given: ReActNet's are used, see the config).
COMMON = dict(optimizer="adam", learning_rate=1e-3, lr_schedule="linear", warmup_epochs=0.0,
              num_epochs=256.0, batch_size=512, objectives="kd")
OFFICIAL = {
    (sdbnn_imagenet, "stage1"): dict(weight_decay=1e-5, kernel_quantizer="identity",
                                     model="birealnet18_sdbnn", init_from=""),
    (sdbnn_imagenet, "stage2"): dict(weight_decay=0.0, kernel_quantizer="",
                                     model="birealnet18_sdbnn",
                                     init_from="runs/sdbnn_imagenet_stage1"),
    (reactnet_imagenet, "step1"): dict(weight_decay=1e-5, kernel_quantizer="identity",
                                       model="reactnet18", init_from=""),
    (reactnet_imagenet, "step2"): dict(weight_decay=0.0, kernel_quantizer="",
                                       model="reactnet18",
                                       init_from="runs/reactnet_imagenet_step1"),
}


@pytest.mark.parametrize("module,step", list(OFFICIAL), ids=lambda v: getattr(v, "__name__", v))
def test_recipe_matches_the_official_code(module, step):
  config = module.get_config(step)
  train.validate_config(config)
  want = OFFICIAL[(module, step)]
  for key, value in COMMON.items():
    assert config[key] == value, key
  assert (config.weight_decay, config.decay_kernels_only) == (want["weight_decay"], True)
  assert not config.decay_dense_kernels  # ReActNet decays 4-d/'conv' parameters, not the fc.
  assert (config.model.name, config.model.kernel_quantizer) == (want["model"],
                                                                want["kernel_quantizer"])
  assert (config.kd.temperature, config.kd.weight, config.cmim.weight) == (1.0, 1.0, 0.0)
  assert config.teacher == "runs/imagenet_teacher" and config.init_from == want["init_from"]
  assert (config.data.name, config.data.image_size) == ("imagenet2012", 224)
  # The step's quantizers: real weights in step 1, the model's binary ones in step 2.
  model = models.from_config(config.model, num_classes=1000)
  assert model.kernel_quantizer == ("identity" if want["kernel_quantizer"] else
                                    {"birealnet18_sdbnn": "wsd_ste_weight",
                                     "reactnet18": "xnor_weight"}[want["model"]])
  assert model.input_quantizer == "approx_sign"


def test_teacher_is_a_torchvision_resnet34():
  config = imagenet_teacher.get_config()
  train.validate_config(config)
  assert config.model.name == "tv_resnet34" and config.objectives == "ce"
  assert (config.optimizer, config.learning_rate, config.batch_size, config.weight_decay,
          config.num_epochs) == ("sgd", 0.1, 256, 1e-4, 90.0)


@pytest.mark.parametrize("module,arg,known", [
    (sdbnn_imagenet, "stage3", "stage1, stage2"), (reactnet_imagenet, "smoke", "step1, step2")])
def test_unknown_step_names_the_known_ones(module, arg, known):
  with pytest.raises(ValueError, match=known):
    module.get_config(arg)


def test_recipes_read_imagenet_as_configs_imagenet_does():
  # Each is built on configs/imagenet.py's data section, and the two-step
  # recipes' smoke on the teacher's shrink, through default_config.sibling_config.
  want = imagenet.get_config().data.to_dict()
  for config in (imagenet_teacher.get_config(), reactnet_imagenet.get_config("step2"),
                 sdbnn_imagenet.get_config("stage1")):
    assert config.data.to_dict() == want
  s2bnn = s2bnn_imagenet.get_config("calibration,step2").data.to_dict()
  assert s2bnn.pop("augment") == "none"  # its views are drawn on device
  assert s2bnn == {k: v for k, v in want.items() if k != "augment"}

  def smoke(c):
    return (c.data.image_size, c.data.eval_split, c.data.workers, c.batch_size,
            c.num_train_steps, c.checkpoint_every_steps, c.model.widths, c.model.stage_sizes)

  teacher = smoke(imagenet_teacher.get_config("smoke"))
  assert teacher == (32, "train[:32]", 0, 16, 4, 4, (16, 32), (1, 1))
  for config in (reactnet_imagenet.get_config("step1,smoke"),
                 sdbnn_imagenet.get_config("stage2,smoke")):
    assert smoke(config) == teacher


# ---------------------------------------------------------------------------
# The smoke chains.

def _imagenet_like(root):
  """``root/train/nXXXXXXXX/0.JPEG``: 1000 classes of one 36x36-ish image."""
  rng = np.random.default_rng(0)
  for c in range(1000):
    d = os.path.join(root, "train", f"n{c:08d}")
    os.makedirs(d)
    size = tuple(int(v) for v in rng.integers(34, 48, size=2))
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(os.path.join(d, "0.JPEG"), quality=80)
  return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _imagenet_like(tmp_path_factory.mktemp("imagenet_like"))


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
  config = imagenet_teacher.get_config("smoke")
  config.data.data_dir = data_dir
  config.data.eval_split = ""  # Only the chain's last run evaluates: each eval compiles.
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(config, workdir)
  return workdir


def _restore(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


@pytest.mark.slow
@pytest.mark.parametrize("module,steps", [(sdbnn_imagenet, ("stage1", "stage2")),
                                          (reactnet_imagenet, ("step1", "step2"))],
                         ids=["sdbnn", "reactnet"])
def test_smoke_chain(module, steps, data_dir, teacher_dir, tmp_path):
  step1_dir, step2_dir = str(tmp_path / steps[0]), str(tmp_path / steps[1])
  config = module.get_config(f"{steps[0]},smoke")
  config.data.data_dir, config.teacher = data_dir, teacher_dir
  config.data.eval_split = ""  # Only the chain's last run evaluates: each eval compiles.
  train.train_and_evaluate(config, step1_dir)

  config2 = module.get_config(f"{steps[1]},smoke")
  config2.data.data_dir, config2.teacher, config2.init_from = data_dir, teacher_dir, step1_dir
  # What step 2 takes from step 1: every weight; SD-BNN's WSD logits are new.
  state, report = teachers.init_from(
      jax.device_get(loop._Setup(config2).initial_state), step1_dir)  # pylint: disable=protected-access
  new = ([f"stage{s}_block1/conv{c}/a" for s in (1, 2) for c in (1, 2)]
         if module is sdbnn_imagenet else [])
  assert sorted(report["new"]) == sorted(new) and report["unused"] == []
  source = _restore(step1_dir)
  for path, want in jax.tree_util.tree_leaves_with_path(source["params"]["model"]):
    got = state.params["model"]
    for key in path:
      got = got[key.key]
    np.testing.assert_array_equal(got, want)
  result = train.train_and_evaluate(config2, step2_dir)
  assert result["num_examples"] == 32 and 0.0 <= result["accuracy"] <= 1.0  # train[:32]

  teacher = _restore(teacher_dir)
  for workdir, quantizer in ((step1_dir, "identity"), (step2_dir, "")):
    saved = _restore(workdir)
    # The teacher rode along frozen: bit-equal to its own checkpoint.
    jax.tree.map(np.testing.assert_array_equal, saved["teacher"]["params"],
                 teacher["params"]["model"])
    records = [r for r in metric_writers.read_metrics(workdir) if r["split"] == "train"]
    assert records and all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in records)
    assert all("ce_loss" not in r for r in records)  # KD alone, as the official trainer
    with open(os.path.join(workdir, "config.json")) as f:
      run = json.load(f)
    assert run["teacher"] == teacher_dir and run["model"]["kernel_quantizer"] == quantizer
  # Step 2 trained on: its weights moved away from step 1's.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       _restore(step2_dir)["params"]["model"]["fc"],
                       source["params"]["model"]["fc"])
  assert min(jax.tree.leaves(moved)) > 0
