"""Objective terms: KD, memory-bank CMIM and CRD against numpy and across
devices, the registry and the config parser, CMIM's layer choice, undecayed
heads, teachers and init_from (merging, errors), CIFAR-100 reflection
padding, and the smoke chain teacher -> student through the CLI configs with
a user-registered term that has params and state."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from cmim_jax import default_config
from cmim_jax import loop
from cmim_jax import losses
from cmim_jax import metric_writers
from cmim_jax import objectives
from cmim_jax import optim
from cmim_jax import teachers
from cmim_jax import train
from cmim_jax.objectives.kd import kd_loss
from configs import cifar100_kd
from configs import cifar100_official
from configs import cifar100_teacher


def numpy_kd(s, t, T):
  """T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T)), and its gradient in s."""
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  s, t = s.astype(np.float64), t.astype(np.float64)
  lt, ls = log_softmax(t / T), log_softmax(s / T)
  value = T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
  grad = T / s.shape[0] * (np.exp(ls) - np.exp(lt))
  return value, grad


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_numpy_value_and_gradient(T):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(12, 7)) * 3, rng.normal(size=(12, 7)) * 3
  value, (gs, gt) = jax.value_and_grad(
      lambda a, b: kd_loss(a, b, temperature=T), argnums=(0, 1))(
          jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  want, want_grad = numpy_kd(s, t, T)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(gs, want_grad, rtol=1e-4, atol=1e-7)
  assert not np.any(gt)  # The teacher gets no gradient.
  np.testing.assert_allclose(kd_loss(jnp.asarray(t), jnp.asarray(t), temperature=T), 0.0,
                             atol=1e-6)


def test_kd_across_eight_devices_equals_one_device():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  ref_value, ref_grad = jax.value_and_grad(lambda a: kd_loss(a, t, temperature=2.0))(s)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.shard_map(lambda a, b: kd_loss(a, b, temperature=2.0, axis_name="data"),
                          mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  value, grad = jax.jit(jax.value_and_grad(sharded))(s, t)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_kd_rejects_mismatched_classes():
  with pytest.raises(ValueError, match="number of classes"):
    kd_loss(jnp.ones((4, 10)), jnp.ones((4, 100)), temperature=1.0)


def test_config_spec_and_weights():
  config = default_config.get_config()
  assert objectives.resolve_weights(config) == [("ce", 1.0), ("cmim", 3.2)]
  config.cmim.weight = 0.5  # Today's key still sets the CMIM weight...
  assert objectives.resolve_weights(config) == [("ce", 1.0), ("cmim", 0.5)]
  config.objectives = "ce:0.25, cmim:2, kd"  # ...unless the spec gives one.
  assert objectives.resolve_weights(config) == [("ce", 0.25), ("cmim", 2.0), ("kd", 1.0)]
  for bad, match in [("ce,,kd", "empty entry"), ("ce,ce", "twice"), ("ce:x", "not a number"),
                     ("ce:-1", ">= 0"), ("ce,simclr", "'simclr'.*known: calibration, ce, cmim, crd, kd, moco")]:
    config.objectives = bad
    with pytest.raises(ValueError, match=match):
      objectives.resolve_weights(config)
  assert {"ce", "cmim", "crd", "kd", "moco", "calibration"} <= set(objectives.names())
  with pytest.raises(ValueError, match="already registered"):
    objectives.register("ce")(lambda context: None)


def _context(spec, teacher=False):
  config = default_config.get_config()
  config.objectives = spec
  return objectives.BuildContext(config=config, model=None, info=None, has_teacher=teacher)


def test_weight_zero_drops_the_term_and_kd_needs_a_teacher():
  terms = objectives.from_config(_context("ce,kd:0"))
  assert [t.name for t in terms] == ["ce"]
  with pytest.raises(ValueError, match="config.teacher is empty"):
    objectives.from_config(_context("ce,kd"))
  assert [t.name for t in objectives.from_config(_context("kd", teacher=True))] == ["kd"]
  with pytest.raises(ValueError, match="no term with a weight > 0"):
    objectives.from_config(_context("ce:0"))


def test_select_layers_orders_numbers_numerically():
  # As pytree dicts hand them over: sorted as strings, block10 before block9.
  paths = sorted([f"stage{s}_block{b}/conv{c}" for s in (1, 2, 10) for b in range(1, 12)
                  for c in (1, 2)])
  assert losses.select_layers(paths, "last:2") == ["stage2_block11/conv2",
                                                   "stage10_block11/conv2"]
  assert losses.select_layers(sorted(f"conv{i}" for i in range(1, 12)), "last:2") == [
      "conv10", "conv11"]


def test_objective_heads_are_not_weight_decayed():
  params = {"model": {"conv": {"kernel": jnp.ones(3)}},
            "objectives": {"cmim": {"proj": {"kernel": jnp.ones(3)}}}}
  tx = optim.create_optimizer(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5,
                              decay_mask=train._model_only)  # pylint: disable=protected-access
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["model"]["conv"]["kernel"], 0.5)
  np.testing.assert_allclose(new["objectives"]["cmim"]["proj"]["kernel"], 1.0)


def test_decay_dense_kernels_false_decays_conv_kernels_only():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"kernel": jnp.ones((4, 10))},
            "bn": {"scale": jnp.ones(4)}}
  for dense in (True, False):
    tx = optim.create_optimizer(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5,
                                decay_dense_kernels=dense)
    zero = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
    np.testing.assert_allclose(new["conv"]["kernel"], 0.5)
    np.testing.assert_allclose(new["fc"]["kernel"], 0.5 if dense else 1.0)
    np.testing.assert_allclose(new["bn"]["scale"], 1.0)


def test_merge_matching_lists_new_and_unused_and_names_shape_mismatches():
  target = {"a": {"kernel": np.zeros((2, 3))}, "b": {"scale": np.zeros(3)}}
  source = {"a": {"kernel": np.ones((2, 3))}, "c": {"bias": np.ones(1)}}
  merged, new, unused = teachers.merge_matching(target, source, what="x")
  np.testing.assert_array_equal(merged["a"]["kernel"], 1.0)
  np.testing.assert_array_equal(merged["b"]["scale"], 0.0)
  assert new == ["b/scale"] and unused == ["c/bias"]
  with pytest.raises(ValueError, match="'a/kernel' has shape \\(3, 3\\)"):
    teachers.merge_matching(target, {"a": {"kernel": np.ones((3, 3))}}, what="x")


# --------------------------------------------------------------- the chain

@objectives.register("probe")
def _probe(context):
  del context
  return ProbeTerm()


@dataclasses.dataclass(frozen=True)
class ProbeTerm(objectives.Objective):
  """A user's term with a trainable scalar and a counter of the examples seen."""
  needs = ("teacher_logits",)

  def init(self, key, example):
    del key
    assert example["teacher_logits"].shape == example["logits"].shape
    return {"w": jnp.zeros(())}, {"seen": jnp.zeros((), jnp.int32)}

  def loss(self, params, state, batch, *, aux, axis_name):
    seen = state["seen"] + jax.lax.psum(aux["labels"].shape[0], axis_name)
    return (params["w"] - 1.0) ** 2, {"seen": seen}, {"w": params["w"]}


def _on_digits(config, steps=4):
  config.data.name = "digits"
  config.data.source = "digits"
  config.data.train_split = "train"
  config.data.eval_split = ""  # No eval-step compile: these tests are about training.
  config.data.augment = "none"
  config.model.stage_sizes = (1, 1, 1)
  config.batch_size = 16
  config.eval_batch_size = 64
  config.num_train_steps = steps
  config.log_every_steps = 2
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  return config


def _restore_raw(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


def _check_init_from(config, teacher_dir):
  """init_from copies every weight the FP teacher has into the binary student."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.objectives, config.teacher, config.init_from = "ce", "", teacher_dir
  setup = loop._Setup(config)  # pylint: disable=protected-access
  state, report = teachers.init_from(jax.device_get(setup.initial_state), teacher_dir)
  source = _restore_raw(teacher_dir)["params"]["model"]
  flat = dict(jax.tree_util.tree_leaves_with_path(state.params["model"]))
  copied = 0
  for path, want in jax.tree_util.tree_leaves_with_path(source):
    if path in flat:
      np.testing.assert_array_equal(flat[path], want)
      copied += 1
  assert copied > 10 and report["step"] == 4 and report["unused"] == []


def test_smoke_chain_teacher_then_student(tmp_path):
  """configs/cifar100_teacher.py:smoke -> cifar100_official.py:smoke (on digits)."""
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  teacher = _on_digits(cifar100_teacher.get_config("smoke"))
  assert teacher.model.name == "resnet20_fp" and teacher.objectives == "ce"
  train.train_and_evaluate(teacher, teacher_dir)

  # The released-code recipe, plus KD and a user's term.
  student = _on_digits(cifar100_official.get_config("smoke"))
  assert student.objectives == "ce,crd"
  _check_init_from(student, teacher_dir)
  student.teacher = teacher_dir
  student.init_from = teacher_dir  # Step 2 of a two-step recipe: the FP weights as a start.
  student.objectives = "ce,crd,kd,probe"
  student.crd.num_negatives, student.crd.embed_dim = 64, 8
  train.train_and_evaluate(student, student_dir)

  saved_teacher = _restore_raw(teacher_dir)
  saved = _restore_raw(student_dir)
  # The teacher rode along frozen: its weights are bit-equal to its own checkpoint.
  jax.tree.map(np.testing.assert_array_equal, saved["teacher"]["params"],
               saved_teacher["params"]["model"])
  jax.tree.map(np.testing.assert_array_equal, saved["teacher"]["batch_stats"],
               saved_teacher["batch_stats"])
  # The user's term: its state saw every example of every step on every device,
  # its parameter was trained by the shared optimizer (SGD pulls w from 0 to 1).
  assert int(saved["objectives"]["probe"]["seen"]) == 4 * 16
  # crd's banks took the rows of the 64 distinct examples of four batches.
  assert int(saved["objectives"]["crd"]["count"]) == 4
  assert (np.asarray(saved["objectives"]["crd"]["labels"]) >= 0).sum() == 4 * 16
  assert 0.0 < float(saved["params"]["objectives"]["probe"]["w"]) < 1.0
  records = [r for r in metric_writers.read_metrics(student_dir) if r["split"] == "train"]
  assert all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in records)
  assert all(np.isfinite(r["crd_loss/student"]) and np.isfinite(r["crd_loss/teacher"])
             for r in records)
  assert all("probe_loss/w" in r and "ce_loss" in r for r in records)
  with open(os.path.join(student_dir, "config.json")) as f:
    assert json.load(f)["teacher"] == teacher_dir


@pytest.mark.parametrize("key,value,error,match", [
    ("teacher", "/nonexistent/run", FileNotFoundError, "config.teacher=.*no such directory"),
    ("init_from", "EMPTY", FileNotFoundError, "config.init_from=.*holds no config.json"),
    ("objectives", "ce,kd", ValueError, "config.teacher is empty"),
])
def test_bad_teacher_or_init_paths_fail_before_training(tmp_path, key, value, error, match):
  config = _on_digits(cifar100_kd.get_config("smoke"))
  config.teacher = ""
  config.objectives = "ce"
  config[key] = str(tmp_path) if value == "EMPTY" else value
  with pytest.raises(error, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ------------------------------------------------ CIFAR-100 reflection padding

def test_cifar100_pads_by_reflection_on_device_and_host():
  from cmim_jax.data import augment, catalogue
  assert catalogue.dataset_spec("cifar100").pad_mode == "reflect"
  assert catalogue.dataset_spec("cifar10").pad_mode == "constant"
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(16, 8, 8, 3), dtype=np.uint8)  # No zero pixel.
  keys = augment.example_keys(jax.random.PRNGKey(0), 16)
  reflected = np.asarray(augment.pad_crop_flip(keys, jnp.asarray(images), 2, "reflect"))
  zeros = np.asarray(augment.pad_crop_flip(keys, jnp.asarray(images), 2))
  assert np.any(zeros == 0) and not np.any(reflected == 0)  # Same windows, other padding.
  # Every crop is a window of numpy's reflect padding (the host version), maybe flipped.
  offsets = np.array([(r, c) for r in range(5) for c in range(5)])
  for i, crop in enumerate(reflected):
    windows = [augment.pad_crop_flip_np(images[i:i + 1], offsets[j:j + 1], np.array([f]), 2,
                                        "reflect")[0]
               for j in range(len(offsets)) for f in (False, True)]
    assert any(np.array_equal(crop, w) for w in windows)
  padded = np.pad(images[:1], ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(
      augment.pad_crop_flip_np(images[:1], np.array([[0, 0]]), np.array([False]), 2, "reflect"),
      padded[:, :8, :8])


# ------------------------------------------------------ memory-bank negatives

from cmim_jax.objectives import memory  # pylint: disable=g-import-not-at-top


def numpy_memory_infonce(zb, zf, bank_b, bank_f, neg, tau, keep=None):
  def side(anchor, positive, bank):
    total = 0.0
    for i in range(len(anchor)):
      logits = [anchor[i] @ positive[i] / tau]
      for k, n in enumerate(neg[i]):
        if keep is None or keep[i, k]:
          logits.append(anchor[i] @ bank[n] / tau)
      logits = np.asarray(logits, np.float64)
      total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
    return total / len(anchor)
  return 0.5 * (side(zb, zf, bank_f) + side(zf, zb, bank_b))


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_memory_infonce_and_bank_update_match_numpy():
  rng = np.random.default_rng(0)
  zb, zf = _unit(rng, 6, 4), _unit(rng, 6, 4)
  bank_b, bank_f = _unit(rng, 20, 4), _unit(rng, 20, 4)
  neg = rng.integers(0, 20, size=(6, 5))
  keep = rng.random((6, 5)) < 0.7
  for k in (None, keep):
    got = memory.memory_infonce(jnp.asarray(zb), jnp.asarray(zf), jnp.asarray(bank_b),
                                jnp.asarray(bank_f), jnp.asarray(neg), temperature=0.1,
                                keep=None if k is None else jnp.asarray(k))
    np.testing.assert_allclose(got, numpy_memory_infonce(zb, zf, bank_b, bank_f, neg, 0.1, k),
                               rtol=1e-5)
  index = np.array([3, 7, 11])
  new = np.asarray(memory.update_bank(jnp.asarray(bank_b), jnp.asarray(index),
                                      jnp.asarray(zb[:3]), 0.5))
  want = bank_b.copy()
  moved = 0.5 * bank_b[index] + 0.5 * zb[:3]
  want[index] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
  np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)


def test_draw_negatives_skips_own_index_and_depends_on_position_only():
  key = jax.random.PRNGKey(3)
  own = jnp.array([0, 5, 9, 5])
  neg = np.asarray(memory.draw_negatives(key, jnp.arange(4), own, num_data=10, num=500))
  assert neg.min() >= 0 and neg.max() <= 9
  for i in range(4):
    assert int(own[i]) not in neg[i]
    assert len(set(neg[i])) == 9  # Every other row is reachable.
  again = memory.draw_negatives(key, jnp.arange(2, 4), own[2:], num_data=10, num=500)
  np.testing.assert_array_equal(again, neg[2:])


def _memory_term(class_aware):
  from cmim_jax.objectives.cmim import CMIM
  heads = losses.CMIMHeads(layers=("s1/conv", "s2/conv"), embed_dim=8)
  return CMIM(heads=heads, temperature=0.2, negatives="memory", num_data=40,
              num_negatives=12, momentum=0.5, class_aware=class_aware)


def test_memory_term_on_eight_devices_equals_one_device():
  """Same drawn negatives, same loss and head gradients, same bank updates."""
  class_aware = True  # The mask path; without it the term is the same minus the mask.
  term = _memory_term(class_aware)
  rng = np.random.default_rng(1)
  acts = {f"s{i}": {"conv": {"a_B": (jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32),),
                             "a_F": (jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32),)}}
          for i in (1, 2)}
  example = jax.tree.map(lambda x: x[:1], acts)
  params, state = term.init(jax.random.PRNGKey(0), {"binary_acts": example})
  labels = jnp.asarray(rng.integers(0, 3, size=16), jnp.int32)
  index = jnp.asarray(rng.permutation(40)[:16], jnp.int32)
  state = dict(state, labels=state["labels"].at[index[:8]].set(labels[:8]))  # Some seen.

  def run(n):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    def per_device(params, state, acts, labels, index):
      def f(p):
        value, new, _ = term.loss(p, state, {"index": index},
                                  aux={"binary_acts": acts, "labels": labels}, axis_name="data")
        return value, new
      (value, new), grads = jax.value_and_grad(f, has_aux=True)(params)
      return value, new, jax.lax.pmean(grads, "data")
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data"),
                                                        P("data")), out_specs=P())
    return jax.device_get(jax.jit(fn)(params, state, acts, labels, index))

  one, eight = run(1), run(8)
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               eight[2], one[2])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               eight[1], one[1])
  new = one[1]
  # The batch's rows moved (and only those), the labels were recorded, the draw advanced.
  bank0 = np.asarray(state["banks"]["s1_conv"]["f"])
  changed = np.any(np.asarray(new["banks"]["s1_conv"]["f"]) != bank0, axis=1)
  np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(np.asarray(index)))
  np.testing.assert_array_equal(new["labels"][np.asarray(index)], labels)
  assert int(new["count"]) == 1
  # Against numpy with the same draws: the value of the first layer.
  negs = np.asarray(memory.draw_negatives(jax.random.fold_in(state["key"], 0), jnp.arange(16),
                                          index, num_data=40, num=12))
  keep = (np.asarray(state["labels"])[negs] != np.asarray(labels)[:, None]) if class_aware else None
  taps = losses.tapped_activations(acts, term.layers)
  emb = term.heads.apply({"params": params}, taps)
  want = sum(numpy_memory_infonce(np.asarray(zb), np.asarray(zf),
                                  np.asarray(state["banks"][k]["b"]),
                                  np.asarray(state["banks"][k]["f"]), negs, 0.2, keep)
             for k, (zb, zf) in zip(("s1_conv", "s2_conv"), emb.values()))
  np.testing.assert_allclose(one[0], want, rtol=1e-5)


# ------------------------------------------------ crd (released-code form)

from cmim_jax.objectives import crd as crd_lib  # pylint: disable=g-import-not-at-top


def numpy_nce_side(anchor, bank, own, neg, tau, m, log_z=None, keep=None):
  """CRD's NCE written out: P = exp(a.b/tau)/Z, Z = M * mean(exp) on the first batch."""
  rows = np.concatenate([own[:, None], neg], axis=1)
  out = np.exp(np.einsum("bd,bkd->bk", anchor.astype(np.float64), bank[rows]) / tau)
  z = out.mean() * m if log_z is None else np.exp(log_z)
  p = out / z
  k = neg.shape[1]
  d1 = np.log(p[:, 0] / (p[:, 0] + k / m))
  d0 = np.log((k / m) / (p[:, 1:] + k / m))
  if keep is not None:
    d0 = np.where(keep, d0, 0.0)
  return -np.mean(d1 + d0.sum(1)), np.log(z)


def test_memory_terms_without_dataset_index_name_themselves():
  """Both bank terms refuse a batch without 'index', each naming itself (traced
  with eval_shape: the error is raised while tracing, nothing needs to run)."""
  x = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  labels = jax.ShapeDtypeStruct((4,), jnp.int32)
  key = jax.random.PRNGKey(0)
  cmim_term = _memory_term(class_aware=False)
  acts = {f"s{i}": {"conv": {"a_B": (x(4, 4, 4, 3),), "a_F": (x(4, 4, 4, 3),)}} for i in (1, 2)}
  params, state = jax.eval_shape(cmim_term.init, key, {"binary_acts": acts})
  with pytest.raises(ValueError, match=r"cmim.negatives='memory' needs .*batch\['index'\]"):
    jax.eval_shape(lambda p, s, a: cmim_term.loss(p, s, {}, aux=a, axis_name=None),
                   params, state, {"binary_acts": acts, "labels": labels})
  crd_term = crd_lib.CRD(embed_dim=8, num_data=40, num_negatives=12, temperature=0.1,
                         momentum=0.5, class_aware=True)
  aux = {"features": x(4, 6), "teacher_features": x(4, 10), "labels": labels}
  params, state = jax.eval_shape(crd_term.init, key, aux)
  with pytest.raises(ValueError, match=r"the 'crd' objective needs .*batch\['index'\]"):
    jax.eval_shape(lambda p, s, a: crd_term.loss(p, s, {}, aux=a, axis_name=None),
                   params, state, aux)


def test_crd_nce_matches_numpy():
  rng = np.random.default_rng(0)
  anchor, bank = _unit(rng, 6, 4), _unit(rng, 30, 4)
  own = rng.permutation(30)[:6]
  neg = rng.integers(0, 30, size=(6, 5))
  keep = rng.random((6, 5)) < 0.7
  want, log_z = numpy_nce_side(anchor, bank, own, neg, 0.1, 30, keep=keep)
  _, mean_exp = crd_lib.nce_side(jnp.asarray(anchor), jnp.asarray(bank), jnp.asarray(own),
                                 jnp.asarray(neg), 0.0, temperature=0.1, num_data=30)
  np.testing.assert_allclose(np.log(mean_exp) + np.log(30), log_z, rtol=1e-5)
  got, _ = crd_lib.nce_side(jnp.asarray(anchor), jnp.asarray(bank), jnp.asarray(own),
                            jnp.asarray(neg), log_z, temperature=0.1, num_data=30,
                            keep=jnp.asarray(keep))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_crd_term_on_eight_devices_equals_one_device_and_numpy():
  """Two steps (Z set on the first, then fixed): loss, head gradients, banks."""
  term = crd_lib.CRD(embed_dim=8, num_data=40, num_negatives=12, temperature=0.1,
                     momentum=0.5, class_aware=True)
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  t_feats = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
  params, state = term.init(jax.random.PRNGKey(0), {"features": feats[:1],
                                                   "teacher_features": t_feats[:1]})
  labels = jnp.asarray(rng.integers(0, 3, size=16), jnp.int32)
  index = jnp.asarray(rng.permutation(40)[:16], jnp.int32)

  def run(n, state):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    def per_device(params, state, f, tf, labels, index):
      def loss(p):
        value, new, _ = term.loss(p, state, {"index": index},
                                  aux={"features": f, "teacher_features": tf, "labels": labels},
                                  axis_name="data")
        return value, new
      (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
      return value, new, jax.lax.pmean(grads, "data")
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * 2 + (P("data"),) * 4,
                       out_specs=P())
    return jax.device_get(jax.jit(fn)(params, state, feats, t_feats, labels, index))

  one = run(1, state)
  second = run(1, one[1])  # Z now fixed; the banks moved.
  eight = run(8, state)
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  for a, b in ((eight[1], one[1]), (eight[2], one[2])):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
  # numpy, with the term's own draws, embeddings and the Z of the first step.
  head = crd_lib._Embed(8)  # pylint: disable=protected-access
  s = np.asarray(head.apply({"params": params["student"]}, feats))
  t = np.asarray(head.apply({"params": params["teacher"]}, t_feats))
  for step, (st, out) in enumerate(((state, one), (one[1], second))):
    negs = np.asarray(memory.draw_negatives(jax.random.fold_in(st["key"], step),
                                            jnp.arange(16), index, num_data=40, num=12))
    keep = np.asarray(st["labels"])[negs] != np.asarray(labels)[:, None]
    first = step == 0
    lt, zt = numpy_nce_side(t, np.asarray(st["bank_s"]), np.asarray(index), negs, 0.1, 40,
                            None if first else st["log_z_t"], keep)
    ls, zs = numpy_nce_side(s, np.asarray(st["bank_t"]), np.asarray(index), negs, 0.1, 40,
                            None if first else st["log_z_s"], keep)
    np.testing.assert_allclose(out[0], lt + ls, rtol=1e-5)
    np.testing.assert_allclose([out[1]["log_z_t"], out[1]["log_z_s"]], [zt, zs], rtol=1e-5)
  assert one[1]["log_z_t"] != 0.0 and second[1]["log_z_t"] == one[1]["log_z_t"]


@pytest.mark.slow  # Two compiles of a full step with a teacher (~40 s on 2 loaded cores).
def test_train_step_with_teacher_on_eight_devices_equals_one_device():
  """kd + crd through the real step: pmap on 8 devices against shard_map on 1."""
  from cmim_jax import input_pipeline, models  # pylint: disable=g-import-not-at-top
  from cmim_jax.parallel import Parallel  # pylint: disable=g-import-not-at-top
  config = _on_digits(cifar100_official.get_config("smoke"))
  config.objectives, config.teacher = "ce", ""
  config.crd.num_negatives, config.crd.embed_dim = 32, 8
  train_ds, _, info = input_pipeline.get_datasets(config.data, global_batch_size=16, seed=0)
  task = train.build_task(config, info, total_steps=4, steps_per_epoch=train_ds.steps_per_epoch)
  config.objectives = "ce,kd,crd"
  teacher = models.get_model("resnet20_fp", num_classes=info.num_classes, stage_sizes=(1, 1, 1))
  terms = objectives.from_config(objectives.BuildContext(
      config=config, model=task.model, info=info, has_teacher=True))
  task = dataclasses.replace(task, teacher=teacher, objectives=terms)
  x = jnp.zeros((1,) + info.image_shape)
  teacher_vars = jax.jit(lambda k: teacher.init(k, x, train=False))(jax.random.PRNGKey(7))
  batches = [train_ds.get_batch(s) for s in range(2)]

  def run(par):
    state = jax.jit(lambda k, t: train.init_state(task, k, t), out_shardings=par.replicated)(
        jax.random.PRNGKey(0), teacher_vars)
    state, steps, out = par.to_step_layout(state), train.make_steps(task, par), []
    for batch in batches:
      state, m = steps.train(state, par.batch_input(batch))
      out.append(jax.device_get(par.output(m)))
    return jax.device_get(par.from_step_layout(state)), out

  (one, m1), (eight, m8) = run(Parallel("shard_map", num_devices=1)), run(Parallel("pmap"))
  for a, b in zip(m8, m1):
    for k in ("loss", "kd_loss", "crd_loss/student", "crd_loss/teacher"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, eight.params, one.params)
  jax.tree.map(close, eight.objectives, one.objectives)
  # The teacher did not move; the crd heads did (they are trained here).
  jax.tree.map(np.testing.assert_array_equal, one.teacher, jax.device_get(teacher_vars))
  assert m1[0]["kd_loss"] > 0 and int(one.objectives["crd"]["count"]) == 2
