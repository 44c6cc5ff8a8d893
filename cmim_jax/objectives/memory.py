r"""Momentum memory banks of embeddings, indexed by each example's dataset index.

A bank is ``f32[n_data, D]`` of unit rows. Its negatives are drawn per
example: example ``j`` of the global batch draws ``num`` indices from
``fold_in(key, j)``, so the draws do not depend on how many devices share the
batch. After the loss, the rows of the global batch move towards the new
embeddings, ``m * old + (1 - m) * new`` renormalised (CRD's update), from an
``all_gather`` of the batch, so that every device applies every update of the
global batch and the replicated banks stay equal.

Memory: one bank costs ``n_data * D * 4`` bytes on every device: CIFAR
(50,000 x 128) 25.6 MB, ImageNet (1,281,167 x 128) 656 MB per bank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cmim_jax import losses


def random_bank(key: jax.Array, num_data: int, dim: int) -> jax.Array:
  """Unit rows drawn uniformly on the sphere (the banks' starting point)."""
  return losses.l2_normalize(jax.random.normal(key, (num_data, dim), jnp.float32))


def draw_negatives(key: jax.Array, global_position: jax.Array, exclude: jax.Array, *,
                   num_data: int, num: int) -> jax.Array:
  """``i32[b, num]`` bank indices, uniform over ``[0, num_data)`` minus ``exclude[i]``.

  Args:
    key: this step's key.
    global_position: ``i32[b]``, each example's position in the global batch.
    exclude: ``i32[b]``, each example's own dataset index (never its negative).
    num_data: bank size.
    num: negatives per example.
  """
  def one(position, own):
    r = jax.random.randint(jax.random.fold_in(key, position), (num,), 0, num_data - 1)
    return r + (r >= own).astype(r.dtype)  # Skips `own`, keeps the rest uniform.
  return jax.vmap(one)(global_position, exclude)


def require_index(batch, who: str) -> jax.Array:
  """``batch['index']``, or a ValueError saying that ``who`` needs it."""
  if "index" not in batch:
    raise ValueError(f"{who} needs each example's dataset index (batch['index']), which "
                     "the training iterators (in-memory and streamed) yield with each "
                     "training batch; pass batches from cmim_jax's input pipeline.")
  return batch["index"]


def draw_step_negatives(state, index: jax.Array, labels: jax.Array, *, num_data: int,
                        num: int, class_aware: bool, axis_name: str | None
                        ) -> tuple[jax.Array, jax.Array | None]:
  """This step's negatives for a per-device batch, and the class-aware mask.

  The key is ``fold_in(state['key'], state['count'])``, equal on every
  device; example ``i`` of device ``d`` draws at global position
  ``d * b + i`` (:func:`draw_negatives`).

  Args:
    state: holds ``'key'``, ``'count'`` and ``'labels'`` (``i32[num_data]``,
      each bank row's label, -1 before it is first written).
    index: ``i32[b]`` dataset indices of this device's examples.
    labels: ``i32[b]`` their labels.
    num_data: bank size.
    num: negatives per example.
    class_aware: whether to drop negatives of the anchor's class.
    axis_name: the batch axis, or None on one device.

  Returns:
    ``(negatives i32[b, num], keep)``; ``keep`` is ``bool[b, num]``, False
    where the negative's stored label is the anchor's, or None when not
    ``class_aware``.
  """
  b = index.shape[0]
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  key = jax.random.fold_in(state["key"], state["count"])
  negatives = draw_negatives(key, offset + jnp.arange(b), index, num_data=num_data, num=num)
  keep = state["labels"][negatives] != labels[:, None] if class_aware else None
  return negatives, keep


def advance_draws(state, all_index: jax.Array, labels: jax.Array,
                  axis_name: str | None) -> dict[str, jax.Array]:
  """The ``'labels'``, ``'key'`` and ``'count'`` entries of the next state.

  Args:
    state: as for :func:`draw_step_negatives`.
    all_index: ``i32[N]`` the global batch's dataset indices
      (:func:`gather_global` of ``index``).
    labels: ``i32[b]`` this device's labels (gathered here).
    axis_name: the batch axis, or None on one device.
  """
  return {"labels": state["labels"].at[all_index].set(gather_global(labels, axis_name)),
          "key": state["key"], "count": state["count"] + 1}


def memory_infonce(z_b: jax.Array, z_f: jax.Array, bank_b: jax.Array, bank_f: jax.Array,
                   negatives: jax.Array, *, temperature: float,
                   keep: jax.Array | None = None, axis_name: str | None = None) -> jax.Array:
  """Symmetric InfoNCE with negatives from memory banks.

  For example ``i``: ``z_B[i]`` must pick ``z_F[i]`` against ``bank_F[n]``
  for ``n`` in ``negatives[i]``, and ``z_F[i]`` must pick ``z_B[i]`` against
  ``bank_B[n]``; ``L = 1/2 (CE_B + CE_F)``, the mean over the global batch.
  The banks get no gradient.

  Args:
    z_b, z_f: ``f32[b, D]`` unit embeddings of the binary and real activations.
    bank_b, bank_f: ``f32[n_data, D]`` banks of past ``z_B`` and ``z_F``.
    negatives: ``i32[b, K]`` bank indices.
    temperature: tau.
    keep: optional ``bool[b, K]``; False drops that negative (class-aware sampling).
    axis_name: when given, the mean is over the global batch.
  """
  bank_b, bank_f = jax.lax.stop_gradient(bank_b), jax.lax.stop_gradient(bank_f)
  pos = jnp.sum(z_b * z_f, axis=-1, keepdims=True) / temperature

  def side(anchor, bank):
    neg = jnp.einsum("bd,bkd->bk", anchor, bank[negatives]) / temperature
    if keep is not None:
      neg = jnp.where(keep, neg, -jnp.inf)
    logits = jnp.concatenate([pos, neg], axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])

  loss = 0.5 * (side(z_b, bank_f) + side(z_f, bank_b))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def gather_global(x: jax.Array, axis_name: str | None) -> jax.Array:
  """The global batch of ``x`` on every device, typed as replicated; no gradient."""
  x = jax.lax.stop_gradient(x)  # For the banks only (and pmax has no derivative).
  if axis_name is None:
    return x
  # all_gather's result is typed as varying over the axis; its copies are
  # equal, so pmax is exact and makes it replicated (a small [N, ...] array).
  return jax.lax.pmax(jax.lax.all_gather(x, axis_name, tiled=True), axis_name)


def update_bank(bank: jax.Array, index: jax.Array, z: jax.Array, momentum: float) -> jax.Array:
  """``bank[index] <- normalize(m * bank[index] + (1 - m) * z)`` (no gradient)."""
  z = jax.lax.stop_gradient(z)
  new = losses.l2_normalize(momentum * bank[index] + (1.0 - momentum) * z)
  return bank.at[index].set(new)
