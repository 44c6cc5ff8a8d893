"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Appends one JSON object per line: ``{"step", "split", ...metrics}``.

  Also writes TensorBoard event files (tensorboardX) under ``workdir/tb``.
  Every call is a no-op on processes other than 0.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> dict:
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (for plots and tests)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
