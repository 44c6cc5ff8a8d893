"""The trainer: equal numbers across device counts and parallel modes, weight 0
equals the base method, schedules do not retrace, NaN stops the run, resume."""

import functools
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmim_jax import input_pipeline
from cmim_jax import metric_writers
from cmim_jax import train
from cmim_jax.parallel import Parallel
from configs import digits

BATCH = 16


def small_config(**overrides):
  config = digits.get_config("smoke")
  config.batch_size = BATCH
  config.eval_batch_size = 64
  config.data.augment = "device"
  config.cmim.weight = 3.2
  config.cmim.embed_dim = 8
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.log_every_steps = 1
  config.warmup_epochs = 0.0
  config.model.stage_sizes = (1, 1, 1)  # ResNet-8: same code, a third of the compile time.
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@functools.lru_cache(maxsize=None)
def _data(config_key):
  config = small_config(**dict(config_key))
  train_ds, _, info = input_pipeline.get_datasets(
      config.data, global_batch_size=config.batch_size, eval_batch_size=64, seed=config.seed)
  return train_ds, info


def run_steps(par: Parallel, n_steps=2, **overrides):
  """Runs ``n_steps`` of the real train_step under ``par``; returns host state, metrics."""
  config = small_config(**overrides)
  train_ds, info = _data(tuple(sorted((k, v) for k, v in overrides.items() if k.startswith("data."))))
  task = train.build_task(config, info, total_steps=10, steps_per_epoch=train_ds.steps_per_epoch)
  state = jax.jit(functools.partial(train.init_state, task), out_shardings=par.replicated)(
      jax.random.PRNGKey(config.seed))
  step = par.map(functools.partial(train.train_step, task=task), n_replicated=2, n_batch=1)
  state = par.to_step_layout(state)
  it = train_ds.iterator(start_step=0)
  metrics = []
  for i in range(n_steps):
    sched = par.replicated_input(train.schedule_at(config, i, train_ds.steps_per_epoch, 10))
    state, m = step(state, sched, par.batch_input(next(it)))
    metrics.append(jax.device_get(par.output(m)))
  return jax.device_get(par.from_step_layout(state)), metrics, task, config


@pytest.fixture(scope="module")
def one_device_run():
  return run_steps(Parallel("shard_map", num_devices=1))


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eight_devices_equal_one_device(one_device_run, mode):
  ref_state, ref_metrics, _, _ = one_device_run
  state, metrics, _, _ = run_steps(Parallel(mode, num_devices=8))
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["cmim_loss"], r["cmim_loss"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.batch_stats, ref_state.batch_stats, atol=1e-5, rtol=1e-5)
  assert int(state.step) == 2


def test_cmim_changes_the_update(one_device_run):
  """Guards the equality tests: CMIM on and off must give different parameters."""
  ref_state, ref_metrics, task, _ = one_device_run
  assert len(task.layers) == 3
  assert all(np.isfinite(m[f"cmim_loss/{l}"]) for m in ref_metrics for l in task.layers)
  off_state, _, _, _ = run_steps(Parallel("shard_map", num_devices=1), **{"cmim.weight": 0.0})
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                      off_state.params["model"], ref_state.params["model"])
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_weight_zero_equals_hand_written_base_step():
  """cmim.weight=0 is exactly a plain cross-entropy BNN step (written here)."""
  par = Parallel("shard_map", num_devices=1)
  state, metrics, task, config = run_steps(par, n_steps=1, **{"cmim.weight": 0.0})
  assert task.heads is None and "cmim_loss" not in metrics[0]

  train_ds, info = _data(())
  model = task.model.clone(bn_axis_name=None)
  init = jax.jit(functools.partial(train.init_state, task))(jax.random.PRNGKey(config.seed))
  batch = next(train_ds.iterator(0))
  rng = jax.random.fold_in(init.rng, 0)
  # Example i alone, at its global index: the crops of the whole batch.
  images = jnp.concatenate([input_pipeline.preprocess_on_device(
      rng, batch["image"][i:i + 1], info=info, train=True, augment="device",
      index_offset=i) for i in range(BATCH)])
  sched = train.schedule_at(config, 0, train_ds.steps_per_epoch, 10)

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def loss_fn(params):
    logits, new = model.apply({"params": params, "batch_stats": init.batch_stats}, images,
                              train=True, schedule=sched, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), new

  (loss, new), grads = loss_fn(init.params["model"])
  # SGD with momentum and L2 on kernels, the first step: p - lr0 * (g + wd * p).
  lr0 = float(task.learning_rate(0))
  def expected(path, p, g):
    wd = config.weight_decay if path[-1].key == "kernel" else 0.0
    return p - lr0 * (g + wd * p)
  want = jax.tree_util.tree_map_with_path(expected, init.params["model"], grads)
  np.testing.assert_allclose(metrics[0]["loss"], loss, rtol=1e-5)
  chex.assert_trees_all_close(state.params["model"], want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.batch_stats, new["batch_stats"], atol=1e-6)


def test_schedule_values_do_not_retrace():
  config = small_config()
  train_ds, info = _data(())
  task = train.build_task(config, info, total_steps=10, steps_per_epoch=train_ds.steps_per_epoch)
  par = Parallel("shard_map", num_devices=2)
  state = jax.jit(functools.partial(train.init_state, task), out_shardings=par.replicated)(
      jax.random.PRNGKey(0))
  traces = []
  def counted(*args):
    traces.append(1)
    return train.train_step(*args, task=task)
  step = par.map(counted, n_replicated=2, n_batch=1)
  batch = par.batch_input(next(train_ds.iterator(0)))
  for k, t in ((1.0, 1.0), (10.0, 0.1), (1.0, 10.0)):
    state, _ = step(state, par.replicated_input({"k": np.float32(k), "t": np.float32(t)}), batch)
  assert len(traces) == 1


def test_nan_loss_stops_with_the_step(tmp_path):
  config = small_config(learning_rate=1e30, num_train_steps=6, checkpoint_every_steps=2,
                        log_every_steps=3, **{"cmim.weight": 0.0})
  with pytest.raises(FloatingPointError, match=r"at step \d"):
    train.train_and_evaluate(config, str(tmp_path))


def test_resume_equals_uninterrupted_run(tmp_path):
  config = small_config(num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6,
                        keep_checkpoints=5)
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  train.train_and_evaluate(config, str(full))
  shutil.copytree(full, resumed)
  # Forget everything after step 3, as if the run had been killed there.
  shutil.rmtree(resumed / "checkpoints" / "6")
  records = metric_writers.read_metrics(str(resumed))
  with open(resumed / "metrics.jsonl", "w") as f:
    import json
    for r in records:
      if r["step"] <= 3:
        f.write(json.dumps(r) + "\n")
  train.train_and_evaluate(config, str(resumed))
  a = [r for r in metric_writers.read_metrics(str(full)) if r["split"] == "train"]
  b = [r for r in metric_writers.read_metrics(str(resumed)) if r["split"] == "train"]
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-6)
  ea = [r for r in metric_writers.read_metrics(str(full)) if r["split"] == "eval"][-1]
  eb = [r for r in metric_writers.read_metrics(str(resumed)) if r["split"] == "eval"][-1]
  assert ea["accuracy"] == eb["accuracy"] and ea["num_examples"] == eb["num_examples"]
