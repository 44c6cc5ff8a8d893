"""The trainer: equal numbers across device counts and parallel modes, weight 0
equals the base method, the EDE schedule follows the step counter without
retracing, NaN stops the run, resume, the run's config.json."""

import functools
import json
import shutil
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmim_jax import input_pipeline
from cmim_jax import layers
from cmim_jax import metric_writers
from cmim_jax import models
from cmim_jax import train
from cmim_jax import variables
from cmim_jax.parallel import Parallel
from configs import digits

BATCH = 16
TOTAL = 10  # Steps of the runs built here (sets the EDE schedule's length).


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
  config.update_from_flattened_dict(overrides)  # Dotted keys: {"data.augment": ...}.
  return config


@functools.lru_cache(maxsize=None)
def _data(config_key):
  config = small_config(**dict(config_key))
  train_ds, _, info = input_pipeline.get_datasets(
      config.data, global_batch_size=config.batch_size, eval_batch_size=64, seed=config.seed)
  return train_ds, info


def build(par: Parallel, steps_per_epoch=None, **overrides):
  """Config, data, task and initial state (in ``par``'s step layout)."""
  config = small_config(**overrides)
  train_ds, info = _data(tuple(sorted((k, v) for k, v in overrides.items() if k.startswith("data."))))
  task = train.build_task(config, info, total_steps=TOTAL,
                          steps_per_epoch=steps_per_epoch or train_ds.steps_per_epoch)
  state = jax.jit(functools.partial(train.init_state, task), out_shardings=par.replicated)(
      jax.random.PRNGKey(config.seed))
  return config, train_ds, task, par.to_step_layout(state)


def run_steps(par: Parallel, n_steps=2, **overrides):
  """Runs ``n_steps`` of the real train_step under ``par``; returns host state, metrics."""
  config, train_ds, task, state = build(par, **overrides)
  steps = train.make_steps(task, par)
  it = train_ds.iterator(start_step=0)
  metrics = []
  for _ in range(n_steps):
    state, m = steps.train(state, par.batch_input(next(it)))
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
  layers = task.term("cmim").layers
  assert len(layers) == 3
  assert all(np.isfinite(m[f"cmim_loss/{l}"]) for m in ref_metrics for l in layers)
  off_state, _, _, _ = run_steps(Parallel("shard_map", num_devices=1), **{"cmim.weight": 0.0})
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                      off_state.params["model"], ref_state.params["model"])
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_weight_zero_equals_hand_written_base_step():
  """cmim.weight=0 is exactly a plain cross-entropy BNN step (written here)."""
  par = Parallel("shard_map", num_devices=1)
  state, metrics, task, config = run_steps(par, n_steps=1, **{"cmim.weight": 0.0})
  assert [t.name for t in task.objectives] == ["ce"] and "cmim_loss" not in metrics[0]
  assert state.params["objectives"] == {"ce": {}} and state.objectives == {"ce": {}}

  train_ds, info = _data(())
  model = task.model.clone(bn_axis_name=None)
  init = jax.jit(functools.partial(train.init_state, task))(jax.random.PRNGKey(config.seed))
  batch = next(train_ds.iterator(0))
  rng = jax.random.fold_in(init.rng, 0)
  # Example i alone, at its global index: the crops of the whole batch.
  images = jnp.concatenate([input_pipeline.preprocess_on_device(
      rng, batch["image"][i:i + 1], info=info, train=True, augment="device",
      index_offset=i) for i in range(BATCH)])
  # Step 0 is epoch 0: IR-Net's t = t_min and k = max(1/t, 1).
  sched = {"t": np.float32(config.ede.t_min),
           "k": np.float32(max(1.0 / config.ede.t_min, 1.0))}

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


def ede_reference(step, steps_per_epoch, total_steps, t_min, t_max):
  """IR-Net's schedule written out: t moves once an epoch, log-linearly."""
  num_epochs = -(-total_steps // steps_per_epoch)
  progress = min((step // steps_per_epoch) / num_epochs, 1.0)
  t = t_min * 10 ** (progress * np.log10(t_max / t_min))
  return max(1.0 / t, 1.0), t


def test_ede_schedule_follows_the_step_counter_without_retracing(monkeypatch):
  """The step takes (k, t) from state.step: epoch-wise values, one trace."""
  traces = []
  real_step = train.train_step
  def counted(*args, **kwargs):
    traces.append(1)
    return real_step(*args, **kwargs)
  monkeypatch.setattr(train, "train_step", counted)
  par = Parallel("shard_map", num_devices=2)
  # Two steps an epoch over TOTAL=10 steps: five epochs, t moves at steps 2, 4, ...
  _, train_ds, task, state = build(par, steps_per_epoch=2, **{"cmim.weight": 0.0})
  steps = train.make_steps(task, par)
  batch = next(train_ds.iterator(0))
  ts = []
  for step in range(5):
    state, m = steps.train(state, par.batch_input(batch))
    m = jax.device_get(m)
    k, t = ede_reference(step, 2, TOTAL, task.ede_t_min, task.ede_t_max)
    np.testing.assert_allclose([m["ede_k"], m["ede_t"]], [k, t], rtol=1e-5)
    ts.append(float(m["ede_t"]))
  assert len(traces) == 1
  assert ts[0] == ts[1] < ts[2] == ts[3] < ts[4]  # Guards the check above: t moved.


def test_ede_schedule_ends_at_t_max():
  task = train.Task(model=None, objectives=(), tx=None, learning_rate=None, info=None,
                    augment="none", steps_per_epoch=7,
                    total_steps=30, ede_t_min=1e-3, ede_t_max=1e-1)
  for step in (0, 6, 7, 20, 27, 29):
    got = jax.jit(train.ede_schedule, static_argnums=0)(task, step)
    want = ede_reference(step, 7, 30, 1e-3, 1e-1)
    np.testing.assert_allclose([got["k"], got["t"]], want, rtol=1e-5)
  # Past the run (a resumed run with more steps) it holds at t_max.
  np.testing.assert_allclose(train.ede_schedule(task, 1000)["t"], 1e-1, rtol=1e-6)


def test_eval_step_sums_only_unmasked_examples(one_device_run):
  """Loss and accuracy sums against a numpy reference, padding masked out."""
  state, _, task, _ = one_device_run  # Trained 2 steps: BatchNorm statistics moved.
  par = Parallel("shard_map", num_devices=2)
  steps = train.make_steps(task, par)
  train_ds, _ = _data(())
  batch = dict(next(train_ds.iterator(0)))
  mask = np.arange(BATCH) < BATCH - 5
  batch["mask"] = mask
  sums = jax.device_get(steps.eval(state, par.batch_input(batch)))
  images = input_pipeline.preprocess_on_device(
      None, batch["image"], info=task.info, train=False, augment="none")
  logits = np.asarray(task.model.clone(bn_axis_name=None).apply(
      {"params": state.params["model"], "batch_stats": state.batch_stats},
      images, train=False), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -logp[np.arange(BATCH), batch["label"]]
  correct = logits.argmax(-1) == batch["label"]
  np.testing.assert_allclose(sums["loss_sum"], nll[mask].sum(), rtol=1e-5)
  assert sums["correct"] == correct[mask].sum() and sums["count"] == mask.sum()


def test_init_variables_drops_only_the_sown_taps():
  model = models.get_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1))
  x, key = jnp.zeros((1, 8, 8, 1)), jax.random.PRNGKey(3)
  # Shapes only: compiling two ResNet inits would cost more than the test is worth.
  full = jax.eval_shape(lambda k: model.init(k, x, train=False), key)
  kept = jax.eval_shape(lambda k: variables.init_variables(model, k, x), key)
  assert layers.BINARY_ACTS in full
  assert set(kept) == set(full) - {layers.BINARY_ACTS} == {"params", "batch_stats"}
  chex.assert_trees_all_equal_shapes_and_dtypes(kept["params"], full["params"])


def test_run_config_round_trips(tmp_path):
  config = small_config()
  config.data.mean = (0.5,)
  path = train.save_run_config(config, str(tmp_path))
  with open(path) as f:
    assert json.load(f)["model"]["stage_sizes"] == [1, 1, 1]
  loaded = train.load_run_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  assert loaded.model.stage_sizes == (1, 1, 1) and loaded.data.mean == (0.5,)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    train.load_run_config(str(tmp_path / "elsewhere"))


def test_config_missing_a_key_fails_naming_it():
  config = small_config()
  del config.cmim["embed_dim"]
  with pytest.raises(ValueError, match=r"no key 'cmim.embed_dim'.*default_config"):
    train.validate_config(config)


def test_run_driver_names_stay_importable_from_train():
  """The driver moved to cmim_jax.loop; train still hands out the same objects."""
  from cmim_jax import loop  # pylint: disable=g-import-not-at-top
  from cmim_jax.train import evaluate_checkpoint, train_and_evaluate, workdir_lock  # pylint: disable=g-import-not-at-top
  assert train_and_evaluate is loop.train_and_evaluate
  assert evaluate_checkpoint is loop.evaluate_checkpoint
  assert workdir_lock is loop.workdir_lock
  with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
    train.not_a_name  # pylint: disable=pointless-statement


def test_nan_loss_stops_with_the_step(tmp_path):
  config = small_config(learning_rate=1e30, num_train_steps=6, checkpoint_every_steps=2,
                        log_every_steps=3, **{"cmim.weight": 0.0})
  handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  with pytest.raises(FloatingPointError, match=r"at step \d"):
    train.train_and_evaluate(config, str(tmp_path))
  # The failed run's preemption handlers went with it (else they swallow later signals).
  assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers


def test_resume_equals_uninterrupted_run(tmp_path):
  # CMIM with memory-bank negatives: the objectives' state (banks, draw
  # counter) must come back from the checkpoint too.
  config = small_config(num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6,
                        keep_checkpoints=5, **{"cmim.negatives": "memory",
                                               "cmim.num_negatives": 64})
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  train.train_and_evaluate(config, str(full))
  assert train.load_run_config(str(full)).to_dict() == config.to_dict()
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
    np.testing.assert_allclose(ra["cmim_loss"], rb["cmim_loss"], rtol=1e-6)
  ea = [r for r in metric_writers.read_metrics(str(full)) if r["split"] == "eval"][-1]
  eb = [r for r in metric_writers.read_metrics(str(resumed)) if r["split"] == "eval"][-1]
  assert ea["accuracy"] == eb["accuracy"] and ea["num_examples"] == eb["num_examples"]
