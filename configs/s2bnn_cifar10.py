r"""S2-BNN on CIFAR-10, label-free: FP MoCo v2 teacher -> BNN -> linear probe.

The chain (``scripts/s2bnn_chain.py BUDGET`` runs it and prints the table)::

  python -m cmim_jax.main --config configs/s2bnn_cifar10.py:teacher,cpu --workdir runs/s2/teacher
  python -m cmim_jax.main --config configs/s2bnn_cifar10.py:moco,cpu --workdir runs/s2/moco
  python -m cmim_jax.main --config configs/s2bnn_cifar10.py:calibration,cpu \
      --workdir runs/s2/calibration --config.teacher=runs/s2/teacher

The argument is ``STAGE[,BUDGET]``; a bare ``BUDGET`` (``:smoke``, ``:cpu``)
is the chain's first stage, the teacher. Stages:

  teacher            real-valued ``resnet20_fp``, ``moco``: the FP MoCo v2 teacher
  moco               1w1a ``resnet20``, ``moco`` only (the MoCo v2 BNN baseline)
  calibration        1w1a ``resnet20``, ``calibration`` only (S2-BNN, distillation only)
  moco_calibration   1w1a ``resnet20``, ``moco,calibration`` (MoCo v2 + distillation)

Budgets: '' (S2-BNN's recipe scaled to CIFAR: 200 epochs, batch 256, queue
4096), ``cpu`` (train[:45000], 3 epochs of batch 128 per stage, 405k images
in all, then probes on cached features: 57 minutes for the whole chain on
the 2-core CPU, README "S2-BNN on CIFAR-10")
and ``smoke`` (a few steps each, for the test). Every stage uses S2-BNN's optimiser (Adam 3e-4, weight decay 0,
linear decay to 0), MoCo v2 views on device (colour jitter p 0.6 as S2-BNN's
code, no blur at 32 pixels), tau 0.2, EMA 0.999 (0.99 for the short budgets,
where 0.999 would leave the key encoder near its random start) and one step of
training (S2-BNN's two steps on ImageNet: ``configs/s2bnn_imagenet.py``).
No stage reads a label; evaluate each with a linear probe of its frozen
features (``--mode linear_probe``).
"""

from cmim_jax import default_config

STAGES = {
    # stage: (model, objectives)
    "teacher": ("resnet20_fp", "moco"),
    "moco": ("resnet20", "moco"),
    "calibration": ("resnet20", "calibration"),
    "moco_calibration": ("resnet20", "moco,calibration"),
}
BUDGETS = ("", "cpu", "smoke")
SHARED_DATA = "../shared/data/cifar10-train.tar.gz"


def get_config(arg: str = "teacher"):
  stage, _, budget = (arg or "teacher").partition(",")
  if stage in BUDGETS and not budget:
    stage, budget = "teacher", stage
  if stage not in STAGES or budget not in BUDGETS:
    raise ValueError(f"unknown S2-BNN CIFAR-10 argument {arg!r}: write STAGE[,BUDGET] with "
                     f"STAGE in {list(STAGES)} and BUDGET in {list(BUDGETS)}, e.g. "
                     "--config configs/s2bnn_cifar10.py:calibration,cpu.")
  model, objectives = STAGES[stage]
  config = default_config.get_config()
  config.data.name = "cifar10"
  config.data.download = True
  config.data.train_split = "train"
  config.data.eval_split = "test"  # Used by the linear probe; training reads no label.
  config.model.name = model
  config.objectives = objectives
  config.cmim.weight = 0.0
  config.views.augment = "moco_v2"
  config.views.jitter_prob = 0.6  # S2-BNN's code (MoCo v2: 0.8).
  config.views.blur_prob = 0.0  # MoCo v2 blurs 224-pixel crops only.
  config.moco.temperature = 0.2
  config.moco.momentum = 0.999
  config.moco.queue_size = 4096
  config.calibration.temperature = 0.2
  config.batch_size = 256
  config.num_epochs = 200.0
  config.optimizer = "adam"
  config.learning_rate = 3e-4
  config.weight_decay = 0.0
  config.lr_schedule = "linear"
  config.warmup_epochs = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  probe = config.get("linear_probe")  # --mode linear_probe's recipe, per budget.
  if budget == "cpu":
    config.data.train_split = "train[:45000]"
    config.data.eval_split = "train[45000:]"
    config.batch_size = 128
    config.moco.queue_size = 4096
    config.moco.momentum = 0.99
    config.num_epochs = 3.0
    config.checkpoint_every_steps = 500
    if probe is not None:  # Cached (unaugmented) features: seconds per epoch.
      probe.epochs, probe.milestones, probe.augment = 30, (18, 24), False
  elif budget == "smoke":
    config.data.train_split = "train[:512]"
    config.data.eval_split = "train[512:768]"
    config.model.stage_sizes = (1, 1, 1)
    config.batch_size = 32
    config.moco.queue_size = 256
    config.moco.momentum = 0.99
    config.num_epochs = 1.0
    config.num_train_steps = 6
    config.log_every_steps = 3
    config.checkpoint_every_steps = 6
    if probe is not None:
      probe.epochs, probe.milestones, probe.augment, probe.batch_size = 2, (), False, 64
  return config
