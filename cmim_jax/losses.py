"""Losses: cross entropy, symmetric InfoNCE and the CMIM loss.

Pure functions (plus one small Flax module for the CMIM projection heads).
Every loss takes keyword-only hyper-parameters and, where it reduces over the
batch, an optional ``axis_name``: inside ``shard_map``/``pmap`` the value and the
gradients then equal those of the one-device loss on the concatenated global
batch.

References:
  Shang et al., "Network Binarization via Contrastive Learning", ECCV 2022
  (CMIM); Oord et al., "Representation Learning with Contrastive Predictive
  Coding", 2018 (InfoNCE).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# Re-exported: the collection the binary layers sow their taps into.
from cmim_jax.layers import BINARY_ACTS  # pylint: disable=unused-import

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, *, mask: Array | None = None) -> Array:
  """Mean softmax cross entropy with integer labels (optionally masked)."""
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"cross_entropy expects logits [B, K] and labels [B]; got {logits.shape} "
        f"and {labels.shape}.")
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if mask is None:
    return per_example.mean()
  return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _gather(x: Array, axis_name: str | None) -> tuple[Array, Array]:
  """Returns the batch gathered over ``axis_name`` and the offset of ours in it."""
  if axis_name is None:
    return x, jnp.zeros((), jnp.int32)
  # all_gather's transpose is a reduce-scatter: the gradient that other devices'
  # losses send to our rows comes back to us.
  gathered = jax.lax.all_gather(x, axis_name, tiled=True)
  offset = jax.lax.axis_index(axis_name) * x.shape[0]
  return gathered, offset


def infonce(z_b: Array, z_f: Array, *, temperature: float,
            axis_name: str | None = None) -> Array:
  """Symmetric InfoNCE between paired embeddings.

  With ``N`` the global batch, ``S = z_b z_f^T / temperature`` (``N x N``)::

      L = 1/2 [ CE(S, I) + CE(S^T, I) ]

  i.e. row ``i`` of ``z_b`` must pick ``z_f[i]`` among all ``z_f[j]`` of the
  global batch, and vice versa. Under ``shard_map``/``pmap`` with ``axis_name``
  the negatives come from every device (``all_gather``) and the returned value
  is the global mean, so value and gradients equal the one-device loss on the
  concatenated batch.

  Args:
    z_b: ``[B, D]`` embeddings of the binary activations (rows L2-normalised).
    z_f: ``[B, D]`` embeddings of the full-precision activations.
    temperature: softmax temperature tau (> 0).
    axis_name: named mapped axis to gather negatives over, or ``None``.

  Returns:
    The scalar loss, averaged over the global batch.
  """
  if z_b.shape != z_f.shape or z_b.ndim != 2:
    raise ValueError(
        f"infonce expects z_b and z_f of the same shape [B, D]; got {z_b.shape} "
        f"and {z_f.shape}.")
  z_b = z_b.astype(jnp.float32)
  z_f = z_f.astype(jnp.float32)
  all_b, offset = _gather(z_b, axis_name)
  all_f, _ = _gather(z_f, axis_name)
  labels = offset + jnp.arange(z_b.shape[0])
  logits_bf = z_b @ all_f.T / temperature
  logits_fb = z_f @ all_b.T / temperature
  loss = 0.5 * (cross_entropy(logits_bf, labels) + cross_entropy(logits_fb, labels))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def global_average_pool(x: Array) -> Array:
  """Averages every axis between the batch and the channel axis."""
  return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


class ProjectionHead(nn.Module):
  """GAP -> linear to ``embed_dim`` -> L2 normalisation."""
  embed_dim: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = global_average_pool(x.astype(jnp.float32))
    return l2_normalize(nn.Dense(self.embed_dim, name="proj")(x))


def _module_name(path: str) -> str:
  return re.sub(r"[^0-9A-Za-z_]", "_", path)


class CMIMHeads(nn.Module):
  """The two projection heads f_l (binary side) and g_l (real side) per tap.

  Attributes:
    layers: tapped layer paths (as returned by :func:`tapped_activations`).
    embed_dim: output dimension of every head.
  """
  layers: Sequence[str]
  embed_dim: int = 128

  @nn.compact
  def __call__(self, taps: Mapping[str, tuple[Array, Array]]
               ) -> dict[str, tuple[Array, Array]]:
    out = {}
    for layer in self.layers:
      a_b, a_f = taps[layer]
      name = _module_name(layer)
      out[layer] = (ProjectionHead(self.embed_dim, name=f"{name}_binary")(a_b),
                    ProjectionHead(self.embed_dim, name=f"{name}_real")(a_f))
    return out


def binary_layer_paths(binary_acts: Mapping) -> list[str]:
  """Paths (``'/'``-joined module names) of every layer that sowed activations."""
  flat = traverse_util.flatten_dict(dict(binary_acts), sep="/")
  return list(dict.fromkeys(k.rsplit("/", 1)[0] for k in flat))


def _natural_key(path: str) -> list:
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path) if t]


def select_layers(paths: Sequence[str], spec: str | Sequence[str]) -> list[str]:
  """Chooses the CMIM taps among the binary layer ``paths``.

  Args:
    paths: binary layer paths, in any order.
    spec: ``'last:N'`` picks the last binary layer of each of the last ``N``
      stages (a stage is the ``stage{s}`` prefix of the first path component,
      or the component itself for models without stages), "last" and the
      stage order in numeric order of the numbers in the names
      (``block11`` after ``block9``); otherwise a comma-separated string or
      sequence of ``fnmatch`` patterns over paths.

  Raises:
    ValueError: a pattern matches nothing, or nothing was selected.
  """
  if isinstance(spec, str) and spec.startswith("last:"):
    try:
      n = int(spec.split(":", 1)[1])
    except ValueError:
      raise ValueError(f"cmim.layers={spec!r}: expected 'last:N' with an integer N.") from None
    last_of_stage: dict[str, str] = {}
    # Paths often arrive sorted as strings (pytree dict keys are), which puts
    # block10 before block9; order by the numbers instead.
    for p in sorted(paths, key=_natural_key):
      head = p.split("/", 1)[0]
      m = re.match(r"(stage\d+)_", head)
      last_of_stage[m.group(1) if m else head] = p
    chosen = list(last_of_stage.values())[-n:] if n > 0 else []
  else:
    patterns = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    chosen = []
    for pat in patterns:
      hits = [p for p in paths if fnmatch.fnmatchcase(p, pat)]
      if not hits:
        raise ValueError(
            f"cmim.layers pattern {pat!r} matches no binary layer; the model's "
            f"binary layers are: {', '.join(paths)}")
      chosen += [h for h in hits if h not in chosen]
  if not chosen:
    raise ValueError(f"cmim.layers={spec!r} selects no layer among: {', '.join(paths)}")
  return chosen


def tapped_activations(binary_acts: Mapping, layers: Sequence[str]
                       ) -> dict[str, tuple[Array, Array]]:
  """``{layer: (a_B, a_F)}`` from a model's sown ``'binary_acts'`` collection."""
  flat = traverse_util.flatten_dict(dict(binary_acts), sep="/")
  taps = {}
  for layer in layers:
    try:
      # sow appends to a tuple; a layer called once has exactly one entry.
      taps[layer] = (flat[f"{layer}/a_B"][-1], flat[f"{layer}/a_F"][-1])
    except KeyError:
      raise KeyError(f"layer {layer!r} sowed no a_B/a_F; known: "
                     f"{', '.join(binary_layer_paths(binary_acts))}") from None
  return taps


def cmim_loss(embeddings: Mapping[str, tuple[Array, Array]], *,
              temperature: float, axis_name: str | None = None
              ) -> tuple[Array, dict[str, Array]]:
  """CMIM: the sum over tapped layers of symmetric InfoNCE(z_B, z_F).

  Args:
    embeddings: ``{layer: (z_B, z_F)}`` from :class:`CMIMHeads`.
    temperature: InfoNCE temperature (0.1 in the paper's code).
    axis_name: mapped axis to gather negatives over.

  Returns:
    ``(sum_l L_l, {layer: L_l})``.
  """
  per_layer = {layer: infonce(zb, zf, temperature=temperature, axis_name=axis_name)
               for layer, (zb, zf) in embeddings.items()}
  total = sum(per_layer.values()) if per_layer else jnp.zeros(())
  return total, per_layer
