"""PyTorch twin of the linear probe's training, written from S2-BNN's ``main_lincls.py``.

S2-BNN (szq0214/S2-BNN, every ``*/step2/main_lincls.py``) evaluates as MoCo's
linear classification does: only the ``fc`` (``nn.Linear``) is trained, with
``nn.CrossEntropyLoss`` and ``torch.optim.SGD(lr, momentum, weight_decay)``;
before each epoch the learning rate is set to ``lr`` times 0.1 for every
milestone the epoch has reached (``epoch >= milestone``). The backbone is in
eval mode, so here it is replaced by its fixed features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def train_linear(features: np.ndarray, labels: np.ndarray, batches: Sequence[np.ndarray], *,
                 kernel: np.ndarray, bias: np.ndarray, lr: float, momentum: float,
                 weight_decay: float, milestones: Sequence[int], steps_per_epoch: int):
  """Runs one SGD step per batch of rows; returns ``[(loss, kernel [D, C], bias [C])]``."""
  x = torch.tensor(features, dtype=torch.float64)
  y = torch.tensor(labels, dtype=torch.long)
  fc = torch.nn.Linear(kernel.shape[0], kernel.shape[1]).double()
  with torch.no_grad():  # torch keeps the weight as [C, D].
    fc.weight.copy_(torch.tensor(kernel.T))
    fc.bias.copy_(torch.tensor(bias))
  criterion = torch.nn.CrossEntropyLoss()
  optimizer = torch.optim.SGD(fc.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
  out = []
  for step, rows in enumerate(batches):
    if step % steps_per_epoch == 0:  # The start of an epoch: set its rate.
      epoch = step // steps_per_epoch
      rate = lr * 0.1 ** sum(epoch >= m for m in milestones)
      for group in optimizer.param_groups:
        group["lr"] = rate
    rows = torch.as_tensor(np.asarray(rows))
    loss = criterion(fc(x[rows]), y[rows])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    out.append((loss.item(), fc.weight.detach().numpy().T.copy(), fc.bias.detach().numpy().copy()))
  return out
