"""The linear probe: its step against numpy SGD on fixed features, 8 devices ==
1 device, the reported top-1 against features computed apart, cached ==
recomputed features, resume == uninterrupted, and its errors."""

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmim_jax import checkpointing
from cmim_jax import input_pipeline
from cmim_jax import linear_probe
from cmim_jax import metric_writers
from cmim_jax import train
from cmim_jax import variables as variables_lib
from cmim_jax.parallel import Parallel
from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(**overrides):
  c = ml_collections.ConfigDict({"epochs": 4, "learning_rate": 0.5, "momentum": 0.9,
                                 "weight_decay": 1e-3, "batch_size": 16, "milestones": (1, 3),
                                 "augment": False})
  c.update(overrides)
  return c


def numpy_sgd(x, y, kernel, bias, batches, *, lr, momentum, weight_decay, boundaries):
  """Softmax regression by torch.optim.SGD's rule, in float64; per-step losses and params."""
  vk, vb = np.zeros_like(kernel), np.zeros_like(bias)
  out = []
  for step, rows in enumerate(batches):
    xb, yb = x[rows], y[rows]
    z = xb @ kernel + bias
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(yb)), yb]))
    p[np.arange(len(yb)), yb] -= 1.0
    p /= len(yb)
    gk, gb = xb.T @ p + weight_decay * kernel, p.sum(0) + weight_decay * bias
    vk, vb = momentum * vk + gk, momentum * vb + gb
    rate = lr * 0.1 ** sum(step >= b for b in boundaries)
    kernel, bias = kernel - rate * vk, bias - rate * vb
    out.append((loss, kernel.copy(), bias.copy(), rate))
  return out


def _run_steps(par, x, y, batches, section, steps_per_epoch):
  tx, schedule = linear_probe.make_optimizer(section, steps_per_epoch)
  task = linear_probe.ProbeTask(backbone=None, tx=tx, learning_rate=schedule, info=None)
  state = linear_probe.init_state(task, jax.random.PRNGKey(3), feature_dim=x.shape[1],
                                  num_classes=int(y.max()) + 1)
  init = jax.tree.map(np.asarray, state.params)
  step = par.map(functools.partial(linear_probe.train_step_features, task=task),
                 n_replicated=1, n_batch=1)
  state = par.to_step_layout(par.replicate_global(jax.device_get(state)))
  out = []
  for rows in batches:
    state, metrics = step(state, par.batch_input({"feature": x[rows], "label": y[rows]}))
    params = jax.tree.map(np.asarray, par.output(state.params))
    out.append((float(par.output(metrics)["loss"]), params["kernel"], params["bias"],
                float(par.output(metrics)["learning_rate"])))
  return init, out


def test_step_is_sgd_softmax_regression_on_8_and_1_devices():
  """Losses, learning rates and parameters of 4 steps (momentum, weight decay and a
  milestone at epoch 1 and 3, 2 steps an epoch) against numpy, in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 5, size=40).astype(np.int32)
  batches = [rng.permutation(40)[:16] for _ in range(4)]
  section = _section()
  init, eight = _run_steps(Parallel(), x, y, batches, section, 2)
  _, one = _run_steps(Parallel(num_devices=1), x, y, batches, section, 2)
  ref = numpy_sgd(x.astype(np.float64), y, init["kernel"].astype(np.float64),
                  init["bias"].astype(np.float64), batches, lr=0.5, momentum=0.9,
                  weight_decay=1e-3, boundaries=(2, 6))
  assert not init["bias"].any()
  for (l8, k8, b8, r8), (l1, k1, b1, r1), (lr_, kr, br, rr) in zip(eight, one, ref):
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    np.testing.assert_allclose(k8, k1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b8, b1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(l8, lr_, rtol=1e-5)
    np.testing.assert_allclose(k8, kr, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b8, br, rtol=1e-4, atol=1e-6)
    assert r8 == pytest.approx(rr) == pytest.approx(r1)
  assert [r for *_, r in ref] == pytest.approx([0.5, 0.5, 0.05, 0.05])


def test_probe_equals_pytorch_lincls_twin():
  """The same probe (8 devices) against torch.optim.SGD as S2-BNN's main_lincls.py
  drives it (tests/torch_twins/lincls_torch.py), in float64: 6 steps, 2 an epoch,
  milestones at epochs 1 and 2, momentum and weight decay."""
  pytest.importorskip("torch")
  from tests.torch_twins import lincls_torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = rng.normal(size=(48, 7)).astype(np.float32)
  y = rng.integers(0, 4, size=48).astype(np.int32)
  batches = [rng.permutation(48)[:16] for _ in range(6)]
  section = _section(milestones=(1, 2), learning_rate=0.3, weight_decay=1e-2)
  init, ours = _run_steps(Parallel(), x, y, batches, section, 2)
  twin = lincls_torch.train_linear(
      x.astype(np.float64), y, batches, kernel=init["kernel"].astype(np.float64),
      bias=init["bias"].astype(np.float64), lr=0.3, momentum=0.9, weight_decay=1e-2,
      milestones=(1, 2), steps_per_epoch=2)
  for (loss, kernel, bias, _), (t_loss, t_kernel, t_bias) in zip(ours, twin):
    np.testing.assert_allclose(loss, t_loss, rtol=1e-5)
    np.testing.assert_allclose(kernel, t_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias, t_bias, rtol=1e-4, atol=1e-6)
  assert np.abs(ours[-1][1] - init["kernel"]).max() > 1e-2  # It moved.


def test_init_is_mocos_normal_0_01_and_zero_bias():
  tx, schedule = linear_probe.make_optimizer(_section(), 1)
  task = linear_probe.ProbeTask(backbone=None, tx=tx, learning_rate=schedule, info=None)
  params = linear_probe.init_state(task, jax.random.PRNGKey(0), feature_dim=512,
                                   num_classes=100).params
  assert params["kernel"].shape == (512, 100) and params["bias"].shape == (100,)
  assert float(jnp.std(params["kernel"])) == pytest.approx(0.01, rel=0.02)
  assert abs(float(jnp.mean(params["kernel"]))) < 1e-3 and not np.asarray(params["bias"]).any()


def test_eval_counts_only_real_rows_of_the_padded_last_batch():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(21, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=21).astype(np.int32)
  task = linear_probe.ProbeTask(backbone=None, tx=None, learning_rate=None, info=None)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "bias": rng.normal(size=3).astype(np.float32)}
  state = linear_probe.ProbeState(step=np.int32(0), params=params, opt_state={},
                                  rng=np.zeros(2, np.uint32), backbone_step=np.int32(0))
  par = Parallel()
  fn = par.map(functools.partial(linear_probe.eval_step, task=task), n_replicated=1, n_batch=1)
  got = linear_probe.evaluate(fn, par, par.replicate_global(state), x, y, 8)
  z = x.astype(np.float64) @ params["kernel"] + params["bias"]
  loss = np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(21), y])
  assert got["num_examples"] == 21
  assert got["top1"] == pytest.approx(np.mean(z.argmax(-1) == y))
  assert got["loss"] == pytest.approx(loss, rel=1e-5)


def test_bad_linear_probe_values_fail_naming_the_key():
  for key, value in [("epochs", 0), ("learning_rate", -1.0), ("momentum", 1.0),
                     ("weight_decay", -1e-4), ("batch_size", 0), ("milestones", (80, 60)),
                     ("milestones", (0, 10))]:
    config = digits.get_config("smoke")
    config.linear_probe[key] = value
    with pytest.raises(ValueError, match=f"config.linear_probe.{key}="):
      train.validate_config(config)


# --------------------------------------------------------------------------
# On a tiny run of the library (ResNet-8 on digits, 4 steps)
# --------------------------------------------------------------------------

def probe_config(**overrides):
  config = digits.get_config("smoke")
  config.model.stage_sizes = (1, 1, 1)  # ResNet-8: same code, a third of the compile time.
  config.linear_probe.epochs = 3
  config.linear_probe.milestones = (2,)
  config.linear_probe.batch_size = 64
  config.eval_batch_size = 128
  config.log_every_steps = 10
  config.keep_checkpoints = 10
  config.update_from_flattened_dict(overrides)  # Dotted keys: {"data.augment": ...}.
  return config


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
  """A trained (4 steps) workdir; copy it before probing."""
  workdir = tmp_path_factory.mktemp("backbone")
  config = probe_config(objectives="ce", num_train_steps=4, batch_size=16,
                        checkpoint_every_steps=4)
  config.data.eval_split = ""
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _probe_params(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, linear_probe.SUBDIR), read_only=True)
  try:
    parts, step = ckpt.restore_parts(("params", "backbone_step"))
  finally:
    ckpt.close()
  return parts["params"], int(parts["backbone_step"]), step


def _records(workdir):
  return [r for r in metric_writers.read_metrics(workdir) if r["split"] == linear_probe.SPLIT]


@pytest.fixture(scope="module")
def cached_probe(backbone_run, tmp_path_factory):
  workdir = _copy(backbone_run, tmp_path_factory.mktemp("cached") / "w")
  result = linear_probe.run(probe_config(), workdir)
  return workdir, result


def test_reported_top1_is_the_probe_on_features_computed_apart(cached_probe):
  """The record in metrics.jsonl equals the saved probe applied (numpy) to features
  taken by a plain model.apply on the whole held-out split, eval mode."""
  workdir, result = cached_probe
  (record,) = _records(workdir)
  assert record["step"] == 4 and record["top1"] == result["top1"]
  assert record["eval_split"] == "test" and record["augment"] == "none"
  params, backbone_step, probe_step = _probe_params(workdir)
  run_config = train.load_run_config(workdir)
  _, eval_ds, info = input_pipeline.get_datasets(
      probe_config().data, global_batch_size=16, eval_batch_size=512, seed=0)
  batch = next(eval_ds.iterator())
  keep = batch["mask"] > 0
  variables, _ = _restored(workdir)
  model, _ = linear_probe._build_backbone(  # pylint: disable=protected-access
      run_config, variables, info, workdir)
  images = input_pipeline.normalize(batch["image"][keep], info.mean, info.std)
  _, feats = train._apply(model, variables, images, features=True,  # pylint: disable=protected-access
                          train=False)
  z = np.asarray(feats, np.float64) @ params["kernel"] + params["bias"]
  labels = batch["label"][keep]
  top1 = np.mean(z.argmax(-1) == labels)
  loss = np.mean(np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
                 - z[np.arange(len(labels)), labels])
  assert record["num_examples"] == len(labels) == info.num_eval
  assert abs(record["top1"] - top1) <= 1.0 / len(labels)  # One borderline example at most.
  assert record["loss"] == pytest.approx(loss, rel=1e-4)
  assert backbone_step == 4 and probe_step == record["probe_steps"]
  assert record["top1"] > 2.0 / info.num_classes  # Twice chance: the features carry the digit.


def _restored(workdir):
  from cmim_jax import teachers  # pylint: disable=g-import-not-at-top
  return teachers.restore_variables(workdir)


def test_cached_features_equal_recomputed_features(cached_probe, backbone_run, tmp_path):
  workdir, result = cached_probe
  other = _copy(backbone_run, tmp_path / "w")
  again = linear_probe.run(probe_config(), other, cache_train_features=False)
  a, _, _ = _probe_params(workdir)
  b, _, _ = _probe_params(other)
  np.testing.assert_allclose(a["kernel"], b["kernel"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-4, atol=1e-6)
  assert again["top1"] == result["top1"]


def test_preempted_mid_epoch_probe_resumes_exactly(cached_probe, backbone_run, tmp_path,
                                                   monkeypatch):
  """A SIGTERM notice at step 5 (mid-epoch) saves step 5 and returns without a
  result; the same call then ends where the uninterrupted probe did."""
  workdir = _copy(backbone_run, tmp_path / "w")
  monkeypatch.setattr(linear_probe.preemption.PreemptionHandler, "reached",
                      lambda self, step: step == 5)
  assert linear_probe.run(probe_config(), workdir) == {}
  assert _probe_params(workdir)[2] == 5 and not _records(workdir)
  monkeypatch.undo()
  result = linear_probe.run(probe_config(), workdir)
  a, _, _ = _probe_params(cached_probe[0])
  b, _, _ = _probe_params(workdir)
  np.testing.assert_array_equal(a["kernel"], b["kernel"])
  np.testing.assert_array_equal(a["bias"], b["bias"])
  assert result["top1"] == cached_probe[1]["top1"]
  # Run once more: the finished probe is evaluated again, not trained.
  again = linear_probe.run(probe_config(), workdir)
  assert again["top1"] == result["top1"] and len(_records(workdir)) == 2
  assert _probe_params(workdir)[2] == result["probe_steps"]


@pytest.mark.slow  # Two probes that run the backbone every step (~25 s on 2 loaded cores).
def test_resumed_augmented_probe_equals_uninterrupted(cached_probe, backbone_run, tmp_path):
  """Device pad-crop-flip, features recomputed every step; the last checkpoint
  removed and the probe run again ends where the uninterrupted one did."""
  config = probe_config(**{"data.augment": "device", "linear_probe.augment": True})
  full = _copy(backbone_run, tmp_path / "full")
  first = linear_probe.run(config, full)
  assert first["augment"] == "device"
  resumed = _copy(full, tmp_path / "resumed")
  ckpt_dir = os.path.join(resumed, linear_probe.SUBDIR, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert len(steps) == 3  # One per epoch.
  shutil.rmtree(os.path.join(ckpt_dir, str(steps[-1])))
  second = linear_probe.run(config, resumed)
  a, _, _ = _probe_params(full)
  b, _, step = _probe_params(resumed)
  assert step == steps[-1]
  np.testing.assert_array_equal(a["kernel"], b["kernel"])
  np.testing.assert_array_equal(a["bias"], b["bias"])
  assert second["top1"] == first["top1"] and second["loss"] == first["loss"]
  # The augmentation took effect: the unaugmented probe ends elsewhere.
  c, _, _ = _probe_params(cached_probe[0])
  assert np.abs(c["kernel"] - a["kernel"]).max() > 1e-3
  # The copied result of the full run, then the resumed run's.
  assert len(_records(resumed)) == 2


def test_augmented_image_step_8_devices_equal_1(backbone_run):
  """The per-device step on images (augmentation keys per global example,
  backbone in eval mode) gives the same loss and parameters on 8 devices and 1."""
  config = probe_config(**{"data.augment": "device"})
  run_config = train.load_run_config(str(backbone_run))
  train_ds, _, info = input_pipeline.get_datasets(
      config.data, global_batch_size=16, eval_batch_size=16, seed=0)
  variables, _ = _restored(str(backbone_run))
  model, dim = linear_probe._build_backbone(  # pylint: disable=protected-access
      run_config, variables, info, str(backbone_run))
  section = _section(milestones=(1,))
  results = []
  for par in (Parallel(), Parallel(num_devices=1)):
    tx, schedule = linear_probe.make_optimizer(section, 1)
    task = linear_probe.ProbeTask(backbone=model, tx=tx, learning_rate=schedule, info=info,
                                  augment=info.augment)
    state = linear_probe.init_state(task, jax.random.PRNGKey(0), feature_dim=dim,
                                    num_classes=info.num_classes)
    state = par.to_step_layout(par.replicate_global(jax.device_get(state)))
    backbone = par.to_step_layout(par.replicate_global(variables))
    step = par.map(functools.partial(linear_probe.train_step_images, task=task),
                   n_replicated=2, n_batch=1)
    losses = []
    for s in range(2):
      b = train_ds.get_batch(s)
      state, metrics = step(state, backbone, par.batch_input(
          {"image": b["image"], "label": b["label"]}))
      losses.append(float(par.output(metrics)["loss"]))
    results.append((losses, jax.tree.map(np.asarray, par.output(state.params))))
  (l8, p8), (l1, p1) = results
  assert info.augment == "device"
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(p8["kernel"], p1["kernel"], rtol=1e-4, atol=1e-6)


def test_probe_of_another_backbone_step_is_refused(cached_probe, tmp_path, monkeypatch):
  workdir = _copy(cached_probe[0], tmp_path / "w")
  real = linear_probe.teachers.restore_variables
  monkeypatch.setattr(linear_probe.teachers, "restore_variables",
                      lambda path: (real(path)[0], 8))
  with pytest.raises(ValueError, match="trained on the backbone's step 4, but the latest backbone "
                                       "checkpoint is step 8"):
    linear_probe.run(probe_config(), workdir)


def test_workdir_without_a_run_or_of_other_data_fails_clearly(backbone_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    linear_probe.run(probe_config(), str(tmp_path))
  config = probe_config(**{"data.name": "cifar10"})
  with pytest.raises(ValueError, match="was trained on 'digits' but the probe's config.data.name "
                                       "is 'cifar10'"):
    linear_probe.run(config, str(backbone_run))
  with pytest.raises(ValueError, match="config.data.eval_split is empty"):
    linear_probe.run(probe_config(**{"data.eval_split": ""}), str(backbone_run))


def test_command_line_mode_reaches_the_probe(tmp_path):
  """``--mode linear_probe`` runs :func:`linear_probe.run` (the in-process tests
  cover the rest): on an empty workdir it stops with the probe's one-line error,
  where ``--mode train`` would start training."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-m", "cmim_jax.main", "--config", "configs/digits.py:smoke",
                      "--workdir", str(tmp_path), "--mode", "linear_probe"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  assert f"error: no config.json in {tmp_path}" in r.stderr
  assert not os.listdir(tmp_path)  # Nothing written.
