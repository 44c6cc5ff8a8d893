r"""Linear-probe evaluation: a linear classifier on a frozen backbone's features.

``python -m cmim_jax.main --config CFG --workdir W --mode linear_probe``
takes the model of the run in ``W`` (its ``config.json`` and latest
checkpoint), freezes it in eval mode (running BatchNorm statistics) and
trains ``logits = f(x) W + b`` on its penultimate features ``f(x)`` (the
input of the model's ``fc``) with softmax cross entropy, then reports the
held-out top-1 as ``{"split": "linear_probe", "top1", ...}`` in
``W/metrics.jsonl`` at the backbone's step.

The recipe (``config.linear_probe``) defaults to S2-BNN's linear evaluation,
which is MoCo's ``main_lincls.py``: SGD with momentum 0.9, learning rate 0.1
(the command line of S2-BNN's README), batch 256, 100 epochs, learning rate
x0.1 from epochs 60 and 80, no weight decay, ``W ~ N(0, 0.01^2)``, ``b = 0``,
backbone in eval mode, the training split augmented and the held-out split
not. The augmentation is the dataset's own training augmentation in this
library (``data.augment``): for ImageNet that is MoCo's ``RandomResizedCrop``
(area 0.08-1) + flip, its held-out crop MoCo's 224 of 256; for CIFAR the
pad-crop-flip. Nothing is normalised beyond the dataset's mean/std. One
difference: each epoch leaves out the ``N mod batch`` examples its
permutation puts last (this library's training order), where MoCo's loader
trains on a last, smaller batch. Where the training images are not augmented
(``linear_probe.augment=False``, or a dataset whose augmentation is 'none')
the frozen backbone's features are computed once and the probe trains on
them; otherwise each step runs the backbone on its augmented batch.

The steps are per-device functions against the ``'data'`` axis, wrapped by
:class:`~cmim_jax.parallel.Parallel` like the trainer's
(:mod:`cmim_jax.linear_probe_steps`, re-exported here); this module is the
run driver around them. The probe is
resumable: its state is checkpointed (orbax, atomic) in ``W/linear_probe/``
at every epoch end, at its end and on SIGTERM; the data order and the
augmentation are functions of the step, so a resumed probe continues exactly
as an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cmim_jax import checkpointing
from cmim_jax import input_pipeline
from cmim_jax import loop
from cmim_jax import metric_writers
from cmim_jax import models
from cmim_jax import preemption
from cmim_jax import teachers
from cmim_jax import variables as variables_lib
# The pure probe, re-exported: linear_probe.ProbeTask, .init_state, .eval_step, ...
from cmim_jax.linear_probe_steps import (  # noqa: F401
    ProbeState, ProbeTask, backbone_features, eval_step, evaluate, extract_features,
    features_step, init_state, make_optimizer, padded_batches, train_step_features,
    train_step_images)
from cmim_jax.parallel import Parallel, first_copy_to_host
from cmim_jax.run_config import load_run_config, validate_config

SUBDIR = "linear_probe"  # W/linear_probe/{checkpoints, metrics.jsonl}.
SPLIT = "linear_probe"  # The split name of the result in W/metrics.jsonl.


def _read_run(config, workdir: str):
  """``(run_config, variables, step)`` of the run in ``workdir``: its config.json and weights."""
  run_config = load_run_config(workdir)
  if run_config.data.name != config.data.name:
    raise ValueError(f"--workdir {workdir} was trained on {run_config.data.name!r} but the probe's "
                     f"config.data.name is {config.data.name!r}; probe on the data it was trained "
                     "on (its classes and input normalisation).")
  variables, step = teachers.restore_variables(workdir)
  return run_config, variables, step


def _build_backbone(run_config, variables, info, workdir: str) -> tuple[nn.Module, int]:
  """``(model, feature_dim)`` of the run, its checkpoint checked against config.json's model."""
  models.import_modules(run_config.imports)
  model = models.from_config(run_config.model, num_classes=info.num_classes, bn_axis_name=None)
  x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  expected = jax.eval_shape(lambda: variables_lib.init_variables(model, jax.random.PRNGKey(0), x))
  teachers.check_shapes(variables["params"], expected["params"], what=f"--workdir {workdir}")
  task = ProbeTask(backbone=model, tx=optax.identity(), learning_rate=lambda _: 0.0, info=info)
  features = jax.eval_shape(functools.partial(backbone_features, task), variables, x)
  if features.ndim != 2:
    raise ValueError(f"{run_config.model.name}'s fc takes inputs of shape {features.shape}; "
                     "the probe needs pooled [batch, features] inputs.")
  return model, int(features.shape[1])


def _restore(ckpt, initial: ProbeState, backbone_step: int) -> ProbeState:
  """The probe's latest checkpoint, refused when it probed another backbone checkpoint."""
  if ckpt.latest_step() is None:
    return initial
  state = ckpt.restore(initial)
  saved_for = int(first_copy_to_host(state.backbone_step))
  if saved_for != backbone_step:
    raise ValueError(f"the probe in {ckpt.directory} was trained on the backbone's step "
                     f"{saved_for}, but the latest backbone checkpoint is step {backbone_step}; "
                     f"move {os.path.dirname(str(ckpt.directory))} away to probe the new one.")
  logging.info("Resumed the probe at step %d from %s.", int(state.step), ckpt.directory)
  return state


def run(config: ml_collections.ConfigDict, workdir: str, *,
        cache_train_features: bool | None = None) -> dict:
  """Trains the linear probe of the run in ``workdir`` (resuming) and evaluates it.

  Args:
    config: the probe's config: ``linear_probe``, ``data`` (the training and
      held-out splits), ``parallel``, ``seed``, ``eval_batch_size``.
    workdir: a training workdir of this library (config.json + checkpoints).
    cache_train_features: None (default) computes the training features once
      when the training images are not augmented; False recomputes them every
      step (for tests: both give the same probe).

  Returns:
    ``{'top1', 'loss', 'num_examples', ...}`` on ``data.eval_split``; ``{}``
    when preempted.
  """
  validate_config(config)
  with loop.workdir_lock(workdir):
    return _run(config, workdir, cache_train_features)


def _run(config, workdir: str, cache_train_features: bool | None) -> dict:
  section = config.linear_probe
  par = Parallel(config.parallel)
  eval_batch = config.eval_batch_size or section.batch_size
  par.check_batch_size(section.batch_size, "linear_probe.batch_size")
  par.check_batch_size(eval_batch, "eval_batch_size")
  if not config.data.eval_split:
    raise ValueError("config.data.eval_split is empty; the probe reports top-1 on a held-out "
                     "split: name it, e.g. --config.data.eval_split=test.")
  # Before any data is read: fails at once on a workdir without a run or a checkpoint.
  run_config, variables, backbone_step = _read_run(config, workdir)
  data = ml_collections.ConfigDict(config.data.to_dict())
  if not section.augment:
    data.augment = "none"
  get = functools.partial(input_pipeline.get_datasets, global_batch_size=section.batch_size,
                          eval_batch_size=eval_batch, seed=config.seed)
  train_ds, eval_ds, info = get(data)
  cache = info.augment == "none" if cache_train_features is None else cache_train_features
  if cache and info.augment != "none":
    raise ValueError(f"cache_train_features=True needs unaugmented training images; the data "
                     f"augments them ({info.augment!r}).")
  if section.augment and info.augment == "none":
    logging.info("linear_probe.augment=True but data.augment resolves to 'none' for %s: "
                 "the training features are computed once.", info.name)
  backbone, feature_dim = _build_backbone(run_config, variables, info, workdir)
  steps_per_epoch = train_ds.steps_per_epoch
  total = int(section.epochs) * steps_per_epoch
  tx, schedule = make_optimizer(section, steps_per_epoch)
  task = ProbeTask(backbone=backbone, tx=tx, learning_rate=schedule, info=info,
                   augment=info.augment)
  initial = init_state(task, jax.random.PRNGKey(config.seed), feature_dim=feature_dim,
                       num_classes=info.num_classes, backbone_step=backbone_step)
  probe_dir = os.path.join(str(workdir), SUBDIR)
  ckpt = checkpointing.Checkpointer(probe_dir, keep=config.keep_checkpoints)
  writer = metric_writers.MetricWriter(probe_dir, tensorboard=False)
  preempt = preemption.PreemptionHandler()
  try:
    state = _restore(ckpt, par.replicate_global(jax.device_get(initial)), backbone_step)
    start = int(first_copy_to_host(state.step))
    backbone_dev = par.to_step_layout(par.replicate_global(variables))
    extract = par.map(functools.partial(features_step, task=task), n_replicated=1, n_batch=1)
    t_start = time.time()
    eval_x, eval_y = extract_features(extract, par, backbone_dev, eval_ds)
    step_fn = batches = None  # A finished probe is only evaluated.
    if cache and start < total:
      _, in_order, _ = get(ml_collections.ConfigDict({**data.to_dict(),
                                                      "eval_split": data.train_split}))
      train_x, train_y = extract_features(extract, par, backbone_dev, in_order)
      step_fn = par.map(functools.partial(train_step_features, task=task), n_replicated=1,
                        n_batch=1, donate_state=True)
      batches = ({"feature": train_x[rows], "label": train_y[rows]}
                 for rows in map(train_ds.indices, range(start, total)))
    elif start < total:
      fn = par.map(functools.partial(train_step_images, task=task), n_replicated=2, n_batch=1,
                   donate_state=True)
      step_fn = lambda s, b: fn(s, backbone_dev, b)  # noqa: E731
      batches = ({"image": b["image"], "label": b["label"]}
                 for b in train_ds.iterator(start_step=start))
    logging.info("Linear probe of %s (step %d of %s): %d-d features of %d training (%s) and %d "
                 "held-out (%s) examples; %s in %.1f s. SGD lr %g momentum %g wd %g, x0.1 from "
                 "epochs %s; batch %d, %d epochs (%d steps) on %d device(s); augmentation %r.",
                 run_config.model.name, backbone_step, workdir, feature_dim,
                 train_ds.num_examples, data.train_split, len(eval_y), data.eval_split,
                 "features of both computed" if cache else "held-out features computed",
                 time.time() - t_start, section.learning_rate, section.momentum,
                 section.weight_decay, tuple(section.milestones), section.batch_size,
                 section.epochs, total, par.device_count, info.augment)
    preempt.install()
    state_dev = _train(config, par, task, step_fn, batches, par.to_step_layout(state),
                       start=start, total=total, steps_per_epoch=steps_per_epoch, ckpt=ckpt,
                       writer=writer, preempt=preempt)
  finally:
    preempt.uninstall()
    ckpt.close()
    writer.close()
  if state_dev is None:
    return {}  # Preempted; the checkpoint is saved.
  evaluate_fn = par.map(functools.partial(eval_step, task=task), n_replicated=1, n_batch=1)
  result = evaluate(evaluate_fn, par, state_dev, eval_x, eval_y, eval_batch)
  result.update(eval_split=data.eval_split, train_split=data.train_split,
                epochs=int(section.epochs), probe_steps=total, augment=info.augment)
  out = metric_writers.MetricWriter(workdir)
  out.write(backbone_step, SPLIT, result)
  out.close()
  logging.info("Linear probe of step %d: held-out top-1 %.4f, loss %.4f on %s (%d examples).",
               backbone_step, result["top1"], result["loss"], data.eval_split,
               result["num_examples"])
  return result


def _train(config, par: Parallel, task: ProbeTask, step_fn, batches, state_dev, *, start: int,
           total: int, steps_per_epoch: int, ckpt, writer, preempt):
  """Steps ``start .. total``; checkpoints every epoch. Returns the state, None if preempted."""
  log_every = min(config.log_every_steps, steps_per_epoch)
  pending, t_loop = [], time.time()
  for step in range(start, total):
    state_dev, metrics = step_fn(state_dev, par.batch_input(next(batches)))
    done = step + 1
    pending.append(par.output(metrics))
    if done % log_every == 0 or done == total:
      fetched = [first_copy_to_host(m) for m in pending]
      pending.clear()
      summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
      if not np.isfinite(summary["loss"]):
        raise FloatingPointError(f"linear probe loss is {summary['loss']} at step {done}; the last "
                                 f"good checkpoint is in {ckpt.directory}. Lower "
                                 "linear_probe.learning_rate.")
      summary["epoch"] = done / steps_per_epoch
      writer.write(done, "train", summary)
      rate = (done - start) / max(time.time() - t_loop, 1e-9)
      logging.info("probe step %d/%d (epoch %.2f) loss %.4f acc %.4f lr %.4g | %.0f img/s | "
                   "ETA %s", done, total, summary["epoch"], summary["loss"],
                   summary["accuracy"], summary["learning_rate"],
                   rate * config.linear_probe.batch_size,
                   loop.format_eta((total - done) / rate))
    preempted = preempt.reached(done)
    if done % steps_per_epoch == 0 or done == total or preempted:
      ckpt.save(done, par.from_step_layout(state_dev))
    if preempted:
      logging.warning("%s", preempt.exit_line(done, ckpt.directory))
      return None
  if start >= total:
    logging.info("The probe is trained already (step %d of %d); evaluating it.", start, total)
  return state_dev
