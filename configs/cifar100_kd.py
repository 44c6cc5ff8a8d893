r"""CIFAR-100, ResNet-18 1w1a distilled from a trained FP teacher (KD + CE).

  python -m cmim_jax.main --config configs/cifar100_teacher.py --workdir runs/cifar100_teacher
  python -m cmim_jax.main --config configs/cifar100_kd.py --workdir runs/cifar100_kd \
      --config.teacher=runs/cifar100_teacher

The student is the CMIM CIFAR-100 student (``configs/cifar100.py``: IR-Net
quantizers, SGD lr 0.1, cosine over 400 epochs); its loss is
``ce + kd`` with KD at T = 4 (Hinton et al.'s scaling, T^2 * KL). Add CMIM
with ``--config.objectives=ce,kd,cmim``. Two-step training: add
``--config.init_from=WORKDIR`` to start from another run's weights.

``:smoke`` is a CPU run of a minute; give it a ``:smoke`` teacher::

  python -m cmim_jax.main --config configs/cifar100_teacher.py:smoke --workdir /tmp/t
  python -m cmim_jax.main --config configs/cifar100_kd.py:smoke --workdir /tmp/s \
      --config.teacher=/tmp/t
"""

from cmim_jax import default_config


def get_config(variant: str = ""):
  config = default_config.get_config()
  config.data.name = "cifar100"
  config.model.name = "resnet18"  # As configs/cifar100.py.
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.num_epochs = 400.0
  config.decay_kernels_only = False
  config.objectives = "ce,kd"
  config.kd.weight = 1.0
  config.kd.temperature = 4.0
  config.teacher = "runs/cifar100_teacher"
  return default_config.apply_variant(config, variant)
