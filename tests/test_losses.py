"""Losses: InfoNCE against a numpy reference and across devices; CMIM heads."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from cmim_jax import losses
from cmim_jax.parallel import Parallel


def _normalized(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_infonce(zb, zf, tau):
  """Symmetric InfoNCE written out with numpy, row by row."""
  def ce_diag(s):
    s = s - s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  s = zb.astype(np.float64) @ zf.astype(np.float64).T / tau
  return 0.5 * (ce_diag(s) + ce_diag(s.T))


def test_infonce_matches_numpy_reference():
  rng = np.random.default_rng(0)
  zb, zf = _normalized(rng, 16, 8), _normalized(rng, 16, 8)
  for tau in (0.07, 0.1, 1.0):
    got = losses.infonce(jnp.asarray(zb), jnp.asarray(zf), temperature=tau)
    np.testing.assert_allclose(got, numpy_infonce(zb, zf, tau), rtol=1e-5)


def test_infonce_is_low_for_aligned_pairs_and_log_n_for_uninformative():
  rng = np.random.default_rng(1)
  z = _normalized(rng, 32, 64)
  aligned = losses.infonce(jnp.asarray(z), jnp.asarray(z), temperature=0.05)
  same = jnp.ones((32, 64)) / 8.0
  uninformative = losses.infonce(same, same, temperature=0.1)
  assert aligned < 0.05
  np.testing.assert_allclose(uninformative, np.log(32), rtol=1e-5)


def test_infonce_gradients_are_smooth_and_correct():
  rng = np.random.default_rng(2)
  zb, zf = _normalized(rng, 6, 4), _normalized(rng, 6, 4)
  f = functools.partial(losses.infonce, temperature=0.5)
  check_grads(f, (jnp.asarray(zb, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(zb),
                  jnp.asarray(zf)), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_infonce_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    losses.infonce(jnp.ones((4, 3)), jnp.ones((5, 3)), temperature=0.1)


def _mesh(n):
  return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("n_devices", [2, 8])
def test_infonce_across_devices_equals_one_device(n_devices):
  chex.assert_equal(len(jax.devices()) >= n_devices, True)
  rng = np.random.default_rng(3)
  zb, zf = jnp.asarray(_normalized(rng, 32, 16)), jnp.asarray(_normalized(rng, 32, 16))
  one = lambda b, f: losses.infonce(b, f, temperature=0.1)
  ref_value, ref_grads = jax.value_and_grad(one, argnums=(0, 1))(zb, zf)

  sharded = jax.shard_map(
      lambda b, f: losses.infonce(b, f, temperature=0.1, axis_name="data"),
      mesh=_mesh(n_devices), in_specs=(P("data"), P("data")), out_specs=P())
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(zb, zf)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_infonce_without_gather_differs_across_devices():
  """Guards the test above: local negatives only would give another value."""
  rng = np.random.default_rng(4)
  zb, zf = jnp.asarray(_normalized(rng, 32, 16)), jnp.asarray(_normalized(rng, 32, 16))
  ref = losses.infonce(zb, zf, temperature=0.1)
  local = jax.shard_map(
      lambda b, f: jax.lax.pmean(losses.infonce(b, f, temperature=0.1), "data"),
      mesh=_mesh(8), in_specs=(P("data"), P("data")), out_specs=P())
  assert abs(float(jax.jit(local)(zb, zf)) - float(ref)) > 1e-3


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_param_gradients_through_projection_match_one_device(mode):
  """The trainer's convention: per-device grads of replicated params, pmean-ed."""
  rng = np.random.default_rng(5)
  a_b = jnp.asarray(rng.normal(size=(16, 4, 4, 8)), jnp.float32)
  a_f = jnp.asarray(rng.normal(size=(16, 4, 4, 8)), jnp.float32)
  heads = losses.CMIMHeads(layers=("stage1_block1/conv2",), embed_dim=6)
  params = heads.init(jax.random.PRNGKey(0), {"stage1_block1/conv2": (a_b, a_f)})["params"]

  def loss(params, a_b, a_f, axis_name=None):
    emb = heads.apply({"params": params}, {"stage1_block1/conv2": (a_b, a_f)})
    return losses.cmim_loss(emb, temperature=0.2, axis_name=axis_name)[0]

  ref = jax.grad(loss)(params, a_b, a_f)
  par = Parallel(mode)

  def per_device(params, a_b, a_f):
    g = jax.grad(loss)(params, a_b, a_f, "data")
    return jax.lax.pmean(g, "data")

  fn = par.map(per_device, n_replicated=1, n_batch=2)
  out = par.output(fn(par.to_step_layout(par.replicate_global(params)),
                      *par.batch_input({"b": np.asarray(a_b), "f": np.asarray(a_f)}).values()))
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)


def test_projection_head_outputs_unit_vectors():
  head = losses.ProjectionHead(embed_dim=5)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4, 4, 7)), jnp.float32)
  z = head.apply(head.init(jax.random.PRNGKey(0), x), x)
  chex.assert_shape(z, (3, 5))
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_cross_entropy_mask_ignores_padding():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 3.0], [5.0, -5.0]])
  labels = jnp.asarray([0, 1, 1])
  masked = losses.cross_entropy(logits, labels, mask=jnp.asarray([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(masked, losses.cross_entropy(logits[:2], labels[:2]), rtol=1e-6)


PATHS = ["stage1_block1/conv1", "stage1_block1/conv2", "stage2_block1/conv1",
         "stage2_block1/downsample", "stage2_block2/conv2", "stage3_block1/conv1",
         "stage3_block2/conv2", "stage4_block1/conv1", "stage4_block2/conv2"]


def test_select_layers_last_per_stage():
  assert losses.select_layers(PATHS, "last:3") == [
      "stage2_block2/conv2", "stage3_block2/conv2", "stage4_block2/conv2"]
  assert losses.select_layers(["conv2", "conv3", "conv4"], "last:2") == ["conv3", "conv4"]


def test_select_layers_patterns_and_errors():
  assert losses.select_layers(PATHS, "stage4_*/conv2, stage1_block1/conv1") == [
      "stage4_block2/conv2", "stage1_block1/conv1"]
  with pytest.raises(ValueError, match="matches no binary layer.*stage1_block1/conv1"):
    losses.select_layers(PATHS, "stage9*")
  with pytest.raises(ValueError, match="last:N"):
    losses.select_layers(PATHS, "last:x")
