"""S2-BNN's objectives: ``moco`` and ``calibration`` against numpy and across
devices, the real step's key encoder (EMA), queue and label-free mode
(garbage labels change nothing, bit for bit), and the configs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from cmim_jax import input_pipeline
from cmim_jax import objectives
from cmim_jax import run_config
from cmim_jax import step_aux
from cmim_jax import teachers
from cmim_jax import train
from cmim_jax.objectives import memory
from cmim_jax.objectives.calibration import calibration_loss
from cmim_jax.objectives.moco import enqueue, moco_infonce
from cmim_jax.parallel import Parallel
from configs import s2bnn_cifar10
from configs import s2bnn_imagenet


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_moco(q, k, queue, tau):
  """MoCo's InfoNCE (label 0 among [k, queue]) and its gradient in q."""
  logits = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], 1) / tau
  log_p = _log_softmax(logits)
  d = np.exp(log_p)
  d[:, 0] -= 1
  d /= q.shape[0]
  return -np.mean(log_p[:, 0]), (d[:, :1] * k + d[:, 1:] @ queue) / tau


def numpy_calibration(s, t, tau):
  p_t = np.exp(_log_softmax(t / tau))
  value = -np.mean(np.sum(p_t * _log_softmax(s / tau), -1))
  return value, (np.exp(_log_softmax(s / tau)) - p_t) / (s.shape[0] * tau)


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_moco_infonce_matches_numpy_and_eight_devices_equal_one():
  rng = np.random.default_rng(0)
  q, k, queue = (_unit(rng.normal(size=s)) for s in [(16, 8), (16, 8), (48, 8)])
  value, grad = jax.value_and_grad(lambda a: moco_infonce(a, k, queue, temperature=0.2)[0])(
      jnp.asarray(q, jnp.float32))
  want, want_grad = numpy_moco(q, k, queue, 0.2)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)

  def sharded(a, b):
    loss, _ = moco_infonce(a, b, queue, temperature=0.2, axis_name="data")
    new_queue, ptr = enqueue(jnp.asarray(queue, jnp.float32), jnp.int32(32),
                             memory.gather_global(b, "data"))
    return loss, (new_queue, ptr)
  f = jax.shard_map(sharded, mesh=_mesh(), in_specs=(P("data"), P("data")),
                    out_specs=(P(), (P(), P())))
  (value8, (queue8, ptr8)), grad8 = jax.jit(jax.value_and_grad(f, has_aux=True))(
      jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  np.testing.assert_allclose(value8, want, rtol=1e-5)
  np.testing.assert_allclose(grad8, want_grad, rtol=1e-4, atol=1e-6)
  # The global batch's keys, in global order, replace rows 32..47; the pointer wraps.
  np.testing.assert_allclose(queue8[32:], k, rtol=1e-6)
  np.testing.assert_allclose(queue8[:32], queue[:32], rtol=1e-6)
  assert int(ptr8) == 0


def test_calibration_matches_numpy_and_eight_devices_equal_one():
  rng = np.random.default_rng(1)
  s, t = _unit(rng.normal(size=(16, 12))), _unit(rng.normal(size=(16, 12)))
  value, (gs, gt) = jax.value_and_grad(
      lambda a, b: calibration_loss(a, b, temperature=0.2), argnums=(0, 1))(
          jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  want, want_grad = numpy_calibration(s, t, 0.2)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(gs, want_grad, rtol=1e-4, atol=1e-7)
  assert not np.any(gt)  # The teacher gets no gradient.
  f = jax.shard_map(lambda a, b: calibration_loss(a, b, temperature=0.2, axis_name="data"),
                    mesh=_mesh(), in_specs=(P("data"), P("data")), out_specs=P())
  value8, grad8 = jax.jit(jax.value_and_grad(f))(jnp.asarray(s, jnp.float32),
                                                  jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(value8, want, rtol=1e-5)
  np.testing.assert_allclose(grad8, want_grad, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="embed_dim"):
    calibration_loss(jnp.ones((4, 8)), jnp.ones((4, 16)), temperature=0.2)


def _context(spec, teacher=True, **overrides):
  config = s2bnn_cifar10.get_config("moco")
  config.objectives = spec
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return objectives.BuildContext(config=config, model=None, info=None, has_teacher=teacher)


def test_terms_share_the_moco_head_and_check_their_settings():
  terms = {t.name: t.objective for t in objectives.from_config(_context("moco,calibration"))}
  assert terms["calibration"].shared_head == "moco"
  assert not terms["moco"].uses_labels and not terms["calibration"].uses_labels
  alone = objectives.from_config(_context("calibration"))[0].objective
  assert alone.shared_head == ""
  with pytest.raises(ValueError, match="config.teacher is empty"):
    objectives.from_config(_context("calibration", teacher=False))
  with pytest.raises(ValueError, match="multiple of the global batch_size"):
    objectives.from_config(_context("moco", **{"moco.queue_size": 1000}))
  with pytest.raises(ValueError, match="momentum"):
    objectives.from_config(_context("moco", **{"moco.momentum": 1.0}))
  # The calibration term reads the teacher run's head and names what is missing.
  features = jnp.ones((1, 6))
  with pytest.raises(ValueError, match="no trained 'moco' head"):
    alone.init(jax.random.PRNGKey(0), {"features": features, "teacher_objectives": {"ce": {}}})


# ------------------------------------------------------------ the real step

BATCH, QUEUE = 16, 32


def _digits(config):
  config.data.name = "digits"
  config.data.source = "digits"
  config.data.train_split = "train"
  config.data.eval_split = ""
  config.data.augment = "none"
  config.model.stage_sizes = (1, 1, 1)
  config.batch_size = BATCH
  config.moco.queue_size = QUEUE
  config.moco.momentum = 0.9
  config.views.crop_scale = (0.5, 1.0)
  return config


@functools.lru_cache(maxsize=None)
def _moco_task():
  config = _digits(s2bnn_cifar10.get_config("moco,smoke"))
  train_ds, _, info = input_pipeline.get_datasets(config.data, global_batch_size=BATCH, seed=0)
  task = train.build_task(config, info, total_steps=10, steps_per_epoch=train_ds.steps_per_epoch)
  return config, task, [train_ds.get_batch(s) for s in range(2)]


@functools.lru_cache(maxsize=None)
def _compiled(mode):
  _, task, _ = _moco_task()
  par = Parallel(mode, num_devices=1) if mode == "shard_map" else Parallel(mode)
  state = jax.jit(lambda k: train.init_state(task, k), out_shardings=par.replicated)(
      jax.random.PRNGKey(0))
  return par, jax.device_get(state), train.make_steps(task, par, donate_state=False)


def _run(mode, batches):
  """Two steps of the real step from the same initial state (compiled once per mode)."""
  par, state, steps = _compiled(mode)
  states, metrics = [state], []
  state = par.to_step_layout(jax.device_put(state, par.replicated))
  for batch in batches:
    state, m = steps.train(state, par.batch_input(batch))
    states.append(jax.device_get(par.from_step_layout(state)))
    metrics.append(jax.device_get(par.output(m)))
  return states, metrics


@pytest.fixture(scope="module")
def one_device():
  return _run("shard_map", _moco_task()[2])


def test_moco_step_key_encoder_queue_and_loss_match_a_hand_computation(one_device):
  _, task, batches = _moco_task()
  (s0, s1, s2), (m1, _) = one_device
  moco0, moco1, moco2 = (s.objectives["moco"] for s in (s0, s1, s2))
  # The key encoder is a copy of the student at the first step, then its EMA.
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, moco1["key_params"]["model"], s0.params["model"])
  jax.tree.map(same, moco1["key_params"]["head"], s0.params["objectives"]["moco"]["head"])
  ema = jax.tree.map(lambda k, q: 0.9 * k + 0.1 * q, moco1["key_params"],
                     {"model": s1.params["model"], "head": s1.params["objectives"]["moco"]["head"]})
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, moco2["key_params"], ema)
  # Step 1 by hand: views, both encoders in training mode, numpy head and InfoNCE.
  rng = jax.random.fold_in(s0.rng, 0)
  v0, v1 = step_aux.make_views(task, rng, jnp.asarray(batches[0]["image"]), offset=0, count=2)
  model = task.model.clone(bn_axis_name=None)
  schedule = train.ede_schedule(task, 0)

  @jax.jit
  def features(params, images):
    return step_aux.apply_model(model, {"params": params, "batch_stats": s0.batch_stats},
                                images, features=True, train=True, schedule=schedule,
                                mutable=["batch_stats"])[1]

  def embedding(params, head, images):
    f = np.asarray(features(params, images), np.float64)
    h = np.maximum(f @ head["fc1"]["kernel"] + head["fc1"]["bias"], 0)
    return _unit(h @ head["fc2"]["kernel"] + head["fc2"]["bias"])
  head0 = jax.tree.map(np.asarray, s0.params["objectives"]["moco"]["head"])
  q = embedding(s0.params["model"], head0, v0)
  k = embedding(s0.params["model"], head0, v1)
  want, _ = numpy_moco(q, k, np.asarray(moco0["queue"], np.float64), 0.2)
  np.testing.assert_allclose(m1["moco_loss"], want, rtol=1e-4)
  np.testing.assert_allclose(moco1["queue"][:BATCH], k, atol=2e-5)  # Enqueued keys...
  np.testing.assert_array_equal(moco1["queue"][BATCH:], moco0["queue"][BATCH:])
  np.testing.assert_allclose(moco2["queue"][:BATCH], k, atol=2e-5)  # ...then the next batch.
  assert int(moco1["ptr"]) == BATCH and int(moco2["ptr"]) == 0
  assert "accuracy" not in m1  # Label-free: no classifier accuracy.


def test_label_free_step_ignores_labels_bit_for_bit(one_device):
  _, _, batches = _moco_task()
  garbage = [dict(b, label=np.random.default_rng(i).integers(-10**6, 10**6, b["label"].shape)
                  .astype(b["label"].dtype)) for i, b in enumerate(batches)]
  states, metrics = _run("shard_map", garbage)
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, states[-1], one_device[0][-1])
  jax.tree.map(same, metrics, one_device[1])


@pytest.mark.slow  # A second compile of the full step (~80 s on 2 loaded cores).
def test_moco_step_on_eight_devices_equals_one_device(one_device):
  states, metrics = _run("pmap", _moco_task()[2])
  for a, b in zip(metrics, one_device[1]):
    np.testing.assert_allclose(a["moco_loss"], b["moco_loss"], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, states[-1].params, one_device[0][-1].params)
  jax.tree.map(close, states[-1].objectives, one_device[0][-1].objectives)


# ------------------------------------------------------------ configs


def test_cifar10_config_stages_and_budgets():
  for arg in ("smoke", "cpu", "teacher", "moco,cpu", "calibration,smoke", "moco_calibration"):
    config = s2bnn_cifar10.get_config(arg)
    run_config.validate_config(config)
    assert config.views.augment == "moco_v2" and config.views.jitter_prob == 0.6
    assert (config.optimizer, config.learning_rate, config.weight_decay,
            config.lr_schedule) == ("adam", 3e-4, 0.0, "linear")
  assert s2bnn_cifar10.get_config("smoke").model.name == "resnet20_fp"
  assert s2bnn_cifar10.get_config("calibration,cpu").objectives == "calibration"
  with pytest.raises(ValueError, match="STAGE\\[,BUDGET\\]"):
    s2bnn_cifar10.get_config("simclr")


def test_imagenet_config_rows():
  steps = {row: [s2bnn_imagenet.get_config(f"{row},{step}") for step in ("step1", "step2")]
           for row in s2bnn_imagenet.ROWS[1:]}
  for row, (step1, step2) in steps.items():
    assert step1.model.kernel_quantizer == "identity" and step2.model.kernel_quantizer == ""
  base = s2bnn_imagenet.get_config("moco_baseline")
  enhanced, both, distil = (steps[r][1] for r in s2bnn_imagenet.ROWS[1:])
  for c in [base] + [c for pair in steps.values() for c in pair]:
    run_config.validate_config(c)
    assert c.model.name == "reactnet_a" and c.num_epochs == 200.0 and c.batch_size == 256
    assert c.views.augment == "moco_v2" and c.data.augment == "none" and c.views.blur_prob == 0.2
    assert (c.moco.queue_size, c.moco.momentum, c.moco.temperature) == (65536, 0.999, 0.2)
  assert (base.optimizer, base.learning_rate, base.views.jitter_prob, base.objectives,
          base.model.kernel_quantizer) == ("sgd", 0.03, 0.8, "moco", "")
  assert (enhanced.optimizer, enhanced.learning_rate, enhanced.views.jitter_prob,
          enhanced.lr_schedule, enhanced.weight_decay) == ("adam", 3e-4, 0.6, "linear", 1e-4)
  assert both.objectives == "moco,calibration" and both.weight_decay == 0.0
  assert distil.objectives == "calibration" and distil.weight_decay == 0.0
  for bad in ("moco_baseline,step1", "calibration", "calibration,step3", "simclr,step1"):
    with pytest.raises(ValueError, match="ROW,STEP"):
      s2bnn_imagenet.get_config(bad)


# ------------------------------------------------------------ the chain


@pytest.mark.slow  # Three short trainings (and probes, where the mode exists): ~2-4 min.
def test_smoke_chain_teacher_moco_calibration(tmp_path):
  """scripts/s2bnn_chain.py smoke (on digits): FP MoCo teacher -> BNN moco -> BNN calibration."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "s2bnn_chain", os.path.join(os.path.dirname(__file__), "..", "scripts", "s2bnn_chain.py"))
  chain = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(chain)

  def adjust(config):
    config = _digits(config)
    config.data.eval_split = "test"  # For the probes.
    config.num_train_steps = 4
    config.checkpoint_every_steps = 4
    return config
  rows = chain.run_chain("smoke", str(tmp_path), adjust=adjust)
  assert [r["stage"] for r in rows] == ["teacher", "moco", "calibration"]
  assert [r["objectives"] for r in rows] == ["moco", "moco", "calibration"]
  assert all(r["steps"] == 4 and np.isfinite(r["loss"]) for r in rows)
  try:
    import cmim_jax.linear_probe  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    assert all(0.0 <= r["probe_top1"] <= 1.0 and r["probe_examples"] > 0 for r in rows)
  except ImportError:
    assert all("probe_top1" not in r for r in rows)
  # The student distilled from the teacher run's own weights and moco head, unchanged.
  teacher, _ = teachers.restore_variables(str(tmp_path / "teacher"), objectives=True)
  with ocp.CheckpointManager(str(tmp_path / "calibration" / "checkpoints")) as manager:
    saved = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  jax.tree.map(np.testing.assert_array_equal, saved["teacher"]["objectives"]["moco"],
               teacher["objectives"]["moco"])
  jax.tree.map(np.testing.assert_array_equal, saved["teacher"]["params"], teacher["params"])
  assert "calibration" in open(tmp_path / "calibration" / "metrics.jsonl").read()
  assert chain.format_table(rows, budget="smoke", eval_split="test").count("\n| ") == 3


def test_moco_and_calibration_terms_equal_the_pytorch_twin():
  """One step of moco + calibration (shared head) against S2-BNN's loop, written in torch."""
  torch = pytest.importorskip("torch", reason="the PyTorch twin needs torch")
  from cmim_jax.objectives.calibration import Calibration  # pylint: disable=g-import-not-at-top
  from cmim_jax.objectives.moco import MoCo  # pylint: disable=g-import-not-at-top
  from torch_twins import s2bnn_torch  # pylint: disable=g-import-not-at-top
  b, d_in, feat, hidden, dim, size, tau, m = 8, 6, 5, 7, 4, 16, 0.2, 0.9
  torch.manual_seed(0)
  enc_q, enc_k = (s2bnn_torch.Encoder(d_in, feat, hidden, dim).double() for _ in range(2))
  rng = np.random.default_rng(0)
  view_0, view_1 = rng.normal(size=(b, d_in)), rng.normal(size=(b, d_in))
  t_features = rng.normal(size=(b, 3))
  t_head = {"fc1": {"kernel": rng.normal(size=(3, 6)), "bias": rng.normal(size=6)},
            "fc2": {"kernel": rng.normal(size=(6, dim)), "bias": rng.normal(size=dim)}}
  t_embed = _unit(np.maximum(t_features @ t_head["fc1"]["kernel"] + t_head["fc1"]["bias"], 0)
                  @ t_head["fc2"]["kernel"] + t_head["fc2"]["bias"])
  queue = _unit(rng.normal(size=(size, dim)))

  def head(enc):
    return {n: {"kernel": getattr(enc, n).weight.detach().numpy().T.copy(),
                "bias": getattr(enc, n).bias.detach().numpy().copy()} for n in ("fc1", "fc2")}
  w, head_q = enc_q.backbone.weight.detach().numpy().T.copy(), head(enc_q)
  key_params = {"model": {"w": enc_k.backbone.weight.detach().numpy().T.copy()}, "head": head(enc_k)}
  # The twin's step (queue stored [dim, K], as the reference code).
  t_queue = torch.tensor(queue.T.copy())
  loss_cl, loss_kd, ptr = s2bnn_torch.step(
      enc_q, enc_k, t_queue, 8, torch.tensor(view_0), torch.tensor(view_1),
      torch.tensor(t_embed), T=tau, m=m)
  (loss_cl + loss_kd).backward()

  moco = MoCo(temperature=tau, momentum=m, queue_size=size, embed_dim=dim, hidden_dim=hidden)
  calibration = Calibration(temperature=tau, shared_head="moco", embed_dim=dim)
  with jax.enable_x64(True):
    state = {"key_params": key_params, "key_batch_stats": {}, "queue": jnp.asarray(queue),
             "ptr": jnp.int32(8), "count": jnp.int32(1)}  # Past the first step: an EMA.

    def total(w, head):
      aux = {"features": jnp.asarray(view_0) @ w, "second_view": jnp.asarray(view_1),
             "student": objectives.Student({"w": jax.lax.stop_gradient(w)}, {},
                                           lambda p, bs, x: (None, x @ p["w"], bs)),
             "teacher_features": jnp.asarray(t_features),
             "teacher_objectives": {"moco": {"head": t_head}},
             "objective_params": {"moco": {"head": head}}}
      l_moco, new_state, _ = moco.loss({"head": head}, state, {}, aux=aux, axis_name=None)
      l_cal, _, _ = calibration.loss({}, {}, {}, aux=aux, axis_name=None)
      return l_moco + l_cal, (l_moco, l_cal, new_state)
    (_, (l_moco, l_cal, new_state)), (g_w, g_head) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(jnp.asarray(w), jax.tree.map(jnp.asarray, head_q))
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
  close(l_moco, loss_cl.item())
  close(l_cal, loss_kd.item())
  close(g_w, enc_q.backbone.weight.grad.numpy().T)
  for n in ("fc1", "fc2"):
    close(g_head[n]["kernel"], getattr(enc_q, n).weight.grad.numpy().T)
    close(g_head[n]["bias"], getattr(enc_q, n).bias.grad.numpy())
  close(new_state["key_params"]["model"]["w"], enc_k.backbone.weight.detach().numpy().T)
  jax.tree.map(close, new_state["key_params"]["head"], head(enc_k))
  close(new_state["queue"], t_queue.numpy().T)
  assert int(new_state["ptr"]) == ptr == 0


def test_calibration_from_a_teacher_whose_output_is_the_embedding(tmp_path):
  """A converted MoCo v2 teacher (output = embedding) or a run with a moco head: 'auto' picks."""
  from cmim_jax.objectives.calibration import Calibration  # pylint: disable=g-import-not-at-top
  from cmim_jax.objectives.moco import embed  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  f, t = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), rng.normal(size=(6, 4))
  term = Calibration(temperature=0.2, teacher_head="", embed_dim=4, hidden_dim=7)
  assert "teacher_logits" in term.needs and "teacher_objectives" not in term.needs
  params, _ = term.init(jax.random.PRNGKey(0), {"features": f})
  value, _, _ = term.loss(params, {}, {}, aux={"features": f, "teacher_logits": 3.0 * t,
                                               "objective_params": {}}, axis_name=None)
  s = np.asarray(embed(params["head"], f, hidden=7, dim=4), np.float64)
  np.testing.assert_allclose(value, numpy_calibration(s, _unit(t), 0.2)[0], rtol=1e-5)
  for spec, want in [("moco", "moco"), ("ce,cmim", "")]:
    teacher_config = s2bnn_cifar10.get_config("teacher")
    teacher_config.objectives = spec
    workdir = tmp_path / spec.replace(",", "_")
    os.makedirs(workdir / "checkpoints" / "0")
    run_config.save_run_config(teacher_config, str(workdir))
    config = s2bnn_cifar10.get_config("calibration")
    config.teacher = str(workdir)
    built = objectives.from_config(objectives.BuildContext(
        config=config, model=None, info=None, has_teacher=True))[0].objective
    assert built.teacher_head == want
