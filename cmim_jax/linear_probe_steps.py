"""The linear probe's pure parts: its state, optimizer and per-device steps.

``logits = f(x) W + b`` on a frozen backbone's penultimate features ``f(x)``
(the input of its ``fc``, eval mode, no gradient), trained with softmax cross
entropy. The steps are per-device functions against the ``'data'`` axis,
wrapped by :class:`~cmim_jax.parallel.Parallel` like the trainer's; the host
helpers at the bottom feed them batches and add up their sums. Nothing here
reads or writes files: the run driver, ``--mode linear_probe`` (workdir,
resume, metrics), is :mod:`cmim_jax.linear_probe`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmim_jax import input_pipeline
from cmim_jax import losses
from cmim_jax import step_aux
from cmim_jax.parallel import AXIS, Parallel, first_copy_to_host


@flax.struct.dataclass
class ProbeState:
  """The probe's train state; ``backbone_step`` names the checkpoint it probes."""
  step: jax.Array
  params: Any  # {'kernel': f32[D, C], 'bias': f32[C]}
  opt_state: Any
  rng: jax.Array
  backbone_step: jax.Array


@dataclasses.dataclass(frozen=True)
class ProbeTask:
  """The static parts of the probe's steps.

  Attributes:
    backbone: the frozen model (no cross-device BatchNorm; applied in eval mode).
    tx: the probe's optimizer.
    learning_rate: its schedule, step -> learning rate (logged).
    info: the dataset's ``DatasetInfo`` (normalisation, device augmentation).
    augment: the resolved training augmentation, 'device', 'host' or 'none'.
    axis_name: the device axis the steps reduce over.
  """
  backbone: nn.Module | None
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  info: Any
  augment: str = "none"
  axis_name: str = AXIS


def make_optimizer(section: ml_collections.ConfigDict, steps_per_epoch: int):
  """``(tx, schedule)``: SGD with momentum, the rate x0.1 from each milestone epoch.

  ``torch.optim.SGD``'s update: ``v = momentum * v + g + wd * p``,
  ``p -= lr * v`` (the weight decay enters the gradient before the momentum).
  """
  schedule = optax.piecewise_constant_schedule(
      float(section.learning_rate),
      {int(m) * int(steps_per_epoch): 0.1 for m in section.milestones})
  sgd = optax.sgd(schedule, momentum=float(section.momentum) or None)
  if section.weight_decay:
    return optax.chain(optax.add_decayed_weights(float(section.weight_decay)), sgd), schedule
  return sgd, schedule


def init_state(task: ProbeTask, rng: jax.Array, *, feature_dim: int, num_classes: int,
               backbone_step: int = 0) -> ProbeState:
  """The probe at step 0: ``W ~ N(0, 0.01^2)``, ``b = 0`` (MoCo's lincls)."""
  init_rng, step_rng = jax.random.split(rng)
  params = {"kernel": 0.01 * jax.random.normal(init_rng, (feature_dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  return ProbeState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=task.tx.init(params), rng=step_rng,
                    backbone_step=jnp.asarray(backbone_step, jnp.int32))


# --------------------------------------------------------------------------
# Per-device steps
# --------------------------------------------------------------------------

def _logits(params, features):
  # The head is tiny next to the backbone: full float32 precision costs nothing.
  return jnp.dot(features, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]


def backbone_features(task: ProbeTask, backbone: Mapping, images: jax.Array) -> jax.Array:
  """f32[B, D]: the input of the frozen backbone's ``fc``, eval mode, no gradient."""
  _, features = step_aux.apply_model(task.backbone, backbone, images, features=True, train=False)
  return jax.lax.stop_gradient(features.astype(jnp.float32))


def _update(task: ProbeTask, state: ProbeState, features, labels):
  def loss_fn(params):
    logits = _logits(params, features)
    return losses.cross_entropy(logits, labels), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Every device holds an equal share: the mean of the means is the global mean.
  grads = jax.lax.pmean(grads, task.axis_name)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  metrics = jax.lax.pmean({"loss": loss, "accuracy": accuracy}, task.axis_name)
  metrics["learning_rate"] = task.learning_rate(state.step)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), metrics


def train_step_features(state: ProbeState, batch: Mapping[str, jax.Array], *, task: ProbeTask):
  """One SGD step on this device's rows of precomputed ``{'feature', 'label'}``."""
  return _update(task, state, batch["feature"], batch["label"])


def train_step_images(state: ProbeState, backbone: Mapping, batch: Mapping[str, jax.Array], *,
                      task: ProbeTask):
  """One SGD step on this device's ``{'image': uint8, 'label'}``, augmented as the data says.

  Example ``j`` of the global batch draws its device augmentation from
  ``fold_in(fold_in(state.rng, step), j)``: the same on any number of devices
  and after a resume.
  """
  offset = jax.lax.axis_index(task.axis_name) * batch["label"].shape[0]
  rng = jax.random.fold_in(state.rng, state.step)
  images = input_pipeline.preprocess_on_device(
      rng, batch["image"], info=task.info, train=True, augment=task.augment, index_offset=offset)
  return _update(task, state, backbone_features(task, backbone, images), batch["label"])


def features_step(backbone: Mapping, batch: Mapping[str, jax.Array], *, task: ProbeTask):
  """The global batch's ``{'feature', 'label', 'mask'}`` (not augmented), on every device."""
  images = input_pipeline.preprocess_on_device(None, batch["image"], info=task.info,
                                               train=False, augment="none")
  out = {"feature": backbone_features(task, backbone, images), "label": batch["label"],
         "mask": batch["mask"]}
  return jax.lax.all_gather(out, task.axis_name, tiled=True)


def eval_step(state: ProbeState, batch: Mapping[str, jax.Array], *, task: ProbeTask):
  """``{'loss_sum', 'correct', 'count'}`` over the real (``mask == 1``) rows of the global batch."""
  logits = _logits(state.params, batch["feature"])
  mask = batch["mask"].astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}
  return jax.lax.psum(sums, task.axis_name)


# --------------------------------------------------------------------------
# Host side: features, batches, evaluation
# --------------------------------------------------------------------------

def extract_features(fn, par: Parallel, backbone_dev, data) -> tuple[np.ndarray, np.ndarray]:
  """``(f32[N, D], i32[N])`` of every example of an ``EvalData`` split, in order."""
  feats, labels = [], []
  for batch in data.iterator():
    out = first_copy_to_host(par.output(fn(backbone_dev, par.batch_input(batch))))
    keep = out["mask"] > 0  # The padding of the last batch.
    feats.append(out["feature"][keep])
    labels.append(out["label"][keep])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def padded_batches(features: np.ndarray, labels: np.ndarray, global_batch: int):
  """This process's share of consecutive global batches, the last padded with ``mask == 0``."""
  count, index = jax.process_count(), jax.process_index()
  local = global_batch // count
  for start in range(0, len(labels), global_batch):
    rows = start + index * local + np.arange(local)
    valid = rows < len(labels)
    rows = np.where(valid, rows, 0)
    yield {"feature": features[rows], "label": labels[rows], "mask": valid.astype(np.float32)}


def evaluate(fn, par: Parallel, state_dev, features, labels, global_batch: int) -> dict:
  """Top-1 and mean cross entropy of the probe on precomputed features."""
  totals = None
  for batch in padded_batches(features, labels, global_batch):
    out = par.output(fn(state_dev, par.batch_input(batch)))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = first_copy_to_host(totals)
  count = float(totals["count"])
  return {"top1": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count,
          "num_examples": int(count)}
