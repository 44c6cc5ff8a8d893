"""PyTorch twin of one training step of S2-BNN's "MoCo v2 + distillation" loss.

Written from szq0214/S2-BNN (``Contrastive+Distillation``: ``moco/builder.py``,
``moco/builder_teacher.py``, ``extensions/kd_loss.py``, the loop of
``main_moco.py``) for parity tests, with the backbone reduced to a linear map
so that the objective is what is compared. One step:

1. the key encoder (backbone + MLP head) moves to ``m * key + (1 - m) * query``
   (before the keys are computed);
2. ``q = normalize(head(backbone(view_0)))``, ``k`` the same with the key
   encoder on view 1, without gradient;
3. contrastive loss: cross entropy of ``[q.k, q.queue] / T`` with target 0
   (the queue is stored ``[dim, K]``, one key per column);
4. distillation loss: ``-mean_i sum_d softmax(t_i / T)_d log_softmax(q_i / T)_d``
   with ``t`` the teacher's unit embedding of view 0;
5. the batch's keys overwrite columns ``ptr .. ptr + N`` of the queue.
"""

import torch
import torch.nn.functional as F


class Encoder(torch.nn.Module):
  """A linear backbone (no bias) and MoCo v2's MLP head, ``fc`` replaced by it."""

  def __init__(self, dim_in, features, hidden, dim):
    super().__init__()
    self.backbone = torch.nn.Linear(dim_in, features, bias=False)
    self.fc1 = torch.nn.Linear(features, hidden)
    self.fc2 = torch.nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.relu(self.fc1(self.backbone(x))))


@torch.no_grad()
def momentum_update(encoder_q, encoder_k, m):
  for p_q, p_k in zip(encoder_q.parameters(), encoder_k.parameters()):
    p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)


def distribution_loss(student_scaled, teacher_scaled):
  """S2-BNN's DistributionLoss on already-scaled outputs (``q / T``, ``t / T``)."""
  target = F.softmax(teacher_scaled, dim=1)
  return -(target * F.log_softmax(student_scaled, dim=1)).sum(1).mean()


def step(encoder_q, encoder_k, queue, ptr, view_0, view_1, teacher_embedding, *, T, m):
  """One step's losses; updates ``encoder_k`` and ``queue`` in place.

  Returns:
    ``(loss_contrastive, loss_distillation, new_ptr)``.
  """
  momentum_update(encoder_q, encoder_k, m)
  q = F.normalize(encoder_q(view_0), dim=1)
  with torch.no_grad():
    k = F.normalize(encoder_k(view_1), dim=1)
  logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.clone().detach()], 1) / T
  loss_cl = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
  loss_kd = distribution_loss(q / T, teacher_embedding / T)
  with torch.no_grad():
    n = k.shape[0]
    queue[:, ptr:ptr + n] = k.T
  return loss_cl, loss_kd, (ptr + n) % queue.shape[1]
