r"""ImageNet, full-precision ResNet-34 (torchvision layout): the distillation teacher.

  python -m cmim_jax.main --config configs/imagenet_teacher.py --workdir runs/imagenet_teacher \
      --config.data.data_dir=/data/imagenet

is the teacher both ImageNet two-step recipes read as ``config.teacher``
(``configs/sdbnn_imagenet.py``, ``configs/reactnet_imagenet.py``); SD-BNN and
ReActNet distil from a real-valued ResNet-34. Model ``tv_resnet34``
(torchvision's ``resnet34``; ``--config.model.name=tv_resnet18`` or
``tv_resnet50`` for the others). Cross entropy only. The schedule is
torchvision's reference recipe for its ResNets (SGD momentum 0.9, lr 0.1 at
batch 256, weight decay 1e-4 on every parameter, 90 epochs) with cosine
decay in place of its steps at epochs 30 and 60 (this trainer has no step
schedule). ReActNet's code takes torchvision's *pretrained* ResNet-34
(``pretrained=True``) instead; ``cmim_jax.models.tv_resnet``'s
``from_torchvision_state_dict`` reads those weights, but this library has no
command yet that writes them into a teacher workdir.

``:smoke`` is a CPU run of seconds on any image folder of 1000 classes (the
ImageNet layout ``train/<wnid>/*.JPEG``): two stages of one block, widths 16
and 32 (every kind of layer of the full network, at a fraction of its compile
time), 32x32 crops, 4 steps of 16 (``SMOKE`` below)::

  python -m cmim_jax.main --config configs/imagenet_teacher.py:smoke --workdir /tmp/teacher \
      --config.data.data_dir=/tmp/imagenet_like
"""

from cmim_jax import default_config

# The ``smoke`` shrink of the ImageNet recipe configs (``shrink`` below).
SMOKE = dict(image_size=32, batch_size=16, steps=4, eval_split="train[:32]",
             widths=(16, 32), stage_sizes=(1, 1))


def get_config(variant: str = ""):
  # configs/imagenet.py's data.
  config = default_config.sibling_config(__file__, "imagenet.py").set_data(
      default_config.get_config())
  config.model.name = "tv_resnet34"
  config.objectives = "ce"
  config.cmim.weight = 0.0

  config.batch_size = 256
  config.num_epochs = 90.0
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.decay_kernels_only = False
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0.0

  # 5005 steps per epoch at batch 256.
  config.log_every_steps = 100
  config.eval_every_steps = 5005
  config.checkpoint_every_steps = 2500
  config = default_config.apply_variant(config, variant)
  if variant == "smoke":
    shrink(config)
  return config


def shrink(config):
  """The ``smoke`` shrink (``SMOKE``), shared with ``configs/reactnet_imagenet.py``."""
  config.data.image_size = SMOKE["image_size"]
  config.data.eval_split = SMOKE["eval_split"]
  config.data.workers = 0  # In-process decoding: no worker start-up for 64 images.
  config.batch_size = SMOKE["batch_size"]
  config.num_train_steps = SMOKE["steps"]
  config.log_every_steps = 2
  config.eval_every_steps = SMOKE["steps"]
  config.checkpoint_every_steps = SMOKE["steps"]
  config.model.widths = SMOKE["widths"]
  config.model.stage_sizes = SMOKE["stage_sizes"]
