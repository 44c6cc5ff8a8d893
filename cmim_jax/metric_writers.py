"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard, from process 0 only.

The workdir may be remote (``gs://``, see :mod:`cmim_jax.paths`).
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import jax
import numpy as np

from cmim_jax import paths


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
    root = paths.resolve(workdir)
    self.path = root / "metrics.jsonl"
    self._tb = None
    # Object stores cannot append: a remote metrics.jsonl is rewritten whole
    # (it is small), starting from what an earlier (resumed) run left.
    self._remote_lines = None
    if self.enabled:
      root.mkdir(parents=True, exist_ok=True)
      if paths.is_remote(workdir):
        self._remote_lines = (self.path.read_text().splitlines(keepends=True)
                              if self.path.exists() else [])
      if tensorboard:
        paths.register_tensorboard_backends()
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(root / "tb"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> dict:
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    line = json.dumps(record, allow_nan=True) + "\n"
    if self._remote_lines is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._remote_lines.append(line)
      self.path.write_text("".join(self._remote_lines))
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
  text = (paths.resolve(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
