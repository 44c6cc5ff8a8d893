r"""CIFAR-100, full-precision ResNet-18: the teacher of the distillation recipes.

  python -m cmim_jax.main --config configs/cifar100_teacher.py --workdir runs/cifar100_teacher

then train a student from it (``configs/cifar100_kd.py``, which reads this
workdir as ``config.teacher``). Cross entropy only. The schedule follows the
teacher recipe of CRD's code, on which CMIM's released code builds (240
epochs, lr 0.05, weight decay 5e-4, batch 64); cosine decay replaces its
steps at epochs 150/180/210 (our choice). ``:smoke`` shrinks it to a CPU run
of a minute (a ResNet-20-sized FP net, 20 steps).
"""

from cmim_jax import default_config


def get_config(variant: str = ""):
  config = default_config.get_config()
  config.data.name = "cifar100"
  config.model.name = "resnet18_fp"
  config.objectives = "ce"
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.batch_size = 64
  config.num_epochs = 240.0
  return default_config.apply_variant(config, variant)
