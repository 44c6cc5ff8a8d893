"""The run driver: train (and resume) a workdir, or evaluate its checkpoint.

Everything here touches files (checkpoints, metrics, the run lock, the saved
config); the steps it drives are the pure ones of :mod:`cmim_jax.train`::

  train_and_evaluate(config, workdir)   # --mode train: resumes, saves, evaluates
  evaluate_checkpoint(config, workdir)  # --mode eval: the latest checkpoint

:mod:`cmim_jax.train` re-exports :func:`train_and_evaluate`,
:func:`evaluate_checkpoint` and :func:`workdir_lock` under their old names.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cmim_jax import checkpointing
from cmim_jax import input_pipeline
from cmim_jax import metric_writers
from cmim_jax import preemption
from cmim_jax import runlock
from cmim_jax import teachers
from cmim_jax.parallel import Parallel, first_copy_to_host
from cmim_jax.run_config import save_run_config, validate_config
from cmim_jax.train import TrainState, build_task, init_state, load_teacher, make_steps


class _Setup:
  """Data, task, parallel wrapper and initial state shared by train and eval."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.par = Parallel(config.parallel)
    eval_batch = config.eval_batch_size or config.batch_size
    self.par.check_batch_size(config.batch_size)
    self.par.check_batch_size(eval_batch, "eval_batch_size")
    self.train_ds, self.eval_ds, self.info = input_pipeline.get_datasets(
        config.data, global_batch_size=config.batch_size, eval_batch_size=eval_batch,
        seed=config.seed)
    self.steps_per_epoch = self.train_ds.steps_per_epoch
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else int(config.num_epochs * self.steps_per_epoch))
    self.task = build_task(config, self.info, total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch)
    if config.init_from:  # Fails here, before any step, on a bad path.
      teachers.load_run(config.init_from, "init_from")
    init = jax.jit(functools.partial(init_state, self.task),
                   out_shardings=self.par.replicated)
    self.initial_state = init(jax.random.PRNGKey(config.seed), load_teacher(config, self.task))
    self.steps = make_steps(self.task, self.par, donate_state=True)

  def start_from(self, config) -> TrainState:
    """The fresh state of a new run: ``initial_state``, or ``config.init_from``'s weights."""
    if not config.init_from:
      return self.initial_state
    state, _ = teachers.init_from(jax.device_get(self.initial_state), config.init_from)
    return jax.device_put(state, self.par.replicated)

  def evaluate(self, state_dev) -> dict[str, float]:
    if self.eval_ds is None:
      return {}
    totals = None
    for batch in self.eval_ds.iterator():
      out = self.par.output(self.steps.eval(state_dev, self.par.batch_input(batch)))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = first_copy_to_host(totals)
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count,
            "accuracy": float(totals["correct"]) / count, "num_examples": int(count)}


def format_eta(seconds: float) -> str:
  """``seconds`` as ``H:MM:SS`` (negative counts as 0), for progress lines."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in ``workdir``) and evaluates.

  Only one run may use ``workdir`` at a time (:mod:`cmim_jax.runlock`). On
  SIGTERM/SIGINT every process saves a checkpoint at the same step and the
  function returns early (:mod:`cmim_jax.preemption`).

  Returns:
    The last evaluation's metrics (empty when preempted before an evaluation).
  """
  with workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Process 0 takes the workdir's run lock; every process learns whether it got it."""
  lock = runlock.RunLock(workdir)
  error = ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except runlock.WorkdirLocked as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
      error = f"workdir {workdir} is in use by another run (see process 0's message)."
  if error:
    raise runlock.WorkdirLocked(error)
  try:
    yield lock
  finally:
    lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  setup = _Setup(config)
  par, task, total = setup.par, setup.task, setup.total_steps
  if jax.process_index() == 0:
    save_run_config(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = metric_writers.MetricWriter(workdir)
  if ckpt.latest_step() is not None:  # Resuming wins over init_from.
    state = ckpt.restore(setup.initial_state)
    logging.info("Resumed from the checkpoint of step %d in %s.", int(state.step), ckpt.directory)
  else:
    state = setup.start_from(config)
  start = int(first_copy_to_host(state.step))
  logging.info("Training %s for %d steps (%d per epoch), global batch %d on %d device(s), "
               "%s; objective %s.", config.model.name, total, setup.steps_per_epoch,
               config.batch_size, jax.device_count(), par.mode,
               " + ".join(f"{t.weight:g} * {t.name}" for t in task.objectives))
  for t in task.objectives:
    if t.objective.describe():
      logging.info("  %s: %s", t.name, t.objective.describe())

  state_dev = par.to_step_layout(state)
  batches = setup.train_ds.iterator(start_step=start)
  pending: list[tuple[int, dict]] = []
  last_eval: dict = {}
  t_interval, n_interval, t_start = time.time(), 0, time.time()

  def flush() -> dict | None:
    """Fetches pending step metrics; stops on the first non-finite loss."""
    if not pending:
      return None
    fetched = [(s, first_copy_to_host(m)) for s, m in pending]
    pending.clear()
    for s, m in fetched:
      if not np.isfinite(m["loss"]):
        ckpt.wait()
        raise FloatingPointError(
            f"loss is {m['loss']} at step {s}; stopping. The last good checkpoint "
            f"(step {ckpt.latest_step()}) is in {ckpt.directory}. Lower the learning "
            "rate or check the input data.")
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}

  preempt = preemption.PreemptionHandler().install()
  try:
    for step in range(start, total):
      batch = next(batches)
      state_dev, metrics = setup.steps.train(state_dev, par.batch_input(batch))
      done = step + 1
      pending.append((done, par.output(metrics)))
      n_interval += 1
      is_last = done == total
      if done % config.log_every_steps == 0 or is_last:
        summary = flush()
        elapsed = time.time() - t_interval
        summary["images_per_second"] = n_interval * config.batch_size / max(elapsed, 1e-9)
        summary["epoch"] = done / setup.steps_per_epoch
        summary["images_seen"] = done * config.batch_size
        summary["elapsed_s"] = time.time() - t_start  # Since this process started training.
        writer.write(done, "train", summary)
        rate = (done - start) / max(time.time() - t_start, 1e-9)
        logging.info("step %d/%d (%.1f%%) loss %.4f acc %.4f lr %.4g | %.0f img/s | ETA %s",
                     done, total, 100 * done / total, summary["loss"], summary.get("accuracy", math.nan),
                     summary["learning_rate"], summary["images_per_second"],
                     format_eta((total - done) / rate))
        t_interval, n_interval = time.time(), 0
      preempted = preempt.reached(done)  # Every process, every step: the same answer.
      if done % config.checkpoint_every_steps == 0 or is_last or preempted:
        flush()
        ckpt.save(done, par.from_step_layout(state_dev))
      if preempted:  # (the finally below stops the input and uninstalls the handlers)
        ckpt.close()
        writer.close()
        logging.warning("%s", preempt.exit_line(done, ckpt.directory))
        return last_eval
      # A label-free run's classifier is untrained: its held-out test is a linear probe.
      if ((done % config.eval_every_steps == 0 or is_last) and setup.eval_ds is not None
          and task.uses_labels):
        flush()
        last_eval = setup.evaluate(state_dev)
        writer.write(done, "eval", last_eval)
        logging.info("eval at step %d: loss %.4f accuracy %.4f (%d examples)", done,
                     last_eval["loss"], last_eval["accuracy"], last_eval["num_examples"])
        t_interval = time.time()
  finally:
    # Also when a step raises (a non-finite loss, bad data): the signal handlers
    # of this run go back and streamed-input workers stop, so that a process
    # that carries on (a notebook, a test session) keeps neither. A handler
    # left installed would swallow every later SIGTERM and Ctrl-C.
    preempt.uninstall()
    _close(batches)
  ckpt.close()
  writer.close()
  if start >= total:
    logging.info("Nothing to train: the checkpoint is at step %d of %d.", start, total)
  elif last_eval:
    logging.info("Done: %d steps in %s; held-out accuracy %.4f on %s (%d examples).",
                 total - start, format_eta(time.time() - t_start), last_eval["accuracy"],
                 config.data.eval_split, last_eval["num_examples"])
  return last_eval


def _close(batches) -> None:
  """Releases an input iterator's workers now (streamed input), not at exit."""
  close = getattr(batches, "close", None)
  if close is not None:
    close()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the latest checkpoint in ``workdir``, evaluates ``data.eval_split``."""
  validate_config(config)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is None:
    ckpt.restore(None)  # Raises the error that explains what is missing.
  setup = _Setup(config)
  if setup.eval_ds is None:
    raise ValueError("config.data.eval_split is empty; name the split to evaluate, "
                     "e.g. --config.data.eval_split=test.")
  state = ckpt.restore(setup.initial_state)
  step = int(first_copy_to_host(state.step))
  result = setup.evaluate(setup.par.to_step_layout(state))
  result["eval_split"] = config.data.eval_split
  writer = metric_writers.MetricWriter(workdir)
  writer.write(step, "eval", result)
  writer.close()
  ckpt.close()
  logging.info("eval of step %d on %s: loss %.4f accuracy %.4f (%d examples)", step,
               config.data.eval_split, result["loss"], result["accuracy"],
               result["num_examples"])
  return result
