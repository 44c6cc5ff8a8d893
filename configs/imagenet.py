r"""ImageNet (ILSVRC-2012), Bi-Real ResNet-18 1w1a with CMIM.

  python -m cmim_jax.main --config configs/imagenet.py --workdir runs/imagenet \
      --config.data.data_dir=/data/imagenet

reads ImageNet from ``data.data_dir``, whichever of the three forms it holds
(README, "Data"): an image folder ``train/<wnid>/*.JPEG`` +
``val/<wnid>/*.JPEG`` (torchvision's layout; ``val`` stands in for the
``validation`` split), the ArrayRecord shards ``python -m
cmim_jax.data.convert`` makes of one, or a tfds ``imagenet2012`` prepared as
array_record. Batches are streamed: decoded and cropped in ``data.workers``
worker processes (one per core by default), never held in memory.
Random-resized crop 224 (scale 0.08-1) + flip for training, central 224/256
crop for evaluation on the 50k validation images.

Model ``birealnet18`` with its Bi-Real quantizers (ApproxSign inputs,
magnitude-aware per-channel weights, i.e. ``'xnor_weight'``); the IR-Net EDE
schedule is passed but unused by them. Optimizer after the ReActNet/Bi-Real
ImageNet recipe (ReActNet and Bi-Real papers; docs/METHODS.md), in one step with both weights and
activations binary from the start and no distillation: Adam lr 1e-3 decayed
linearly to 0, batch 512, 256 epochs (SD-BNN's ImageNet length), L2 weight
decay 5e-6 on kernels (between ReActNet's 1e-5 for step 1 and 0 for step 2).

CMIM weight 1.0 at temperature 0.1 on the last binary conv of each of the
last three stages: UNTUNED. The paper's CIFAR lambda is 3.2; its ImageNet
value is not published, so this stays conservative until a sweep says
otherwise. ``cmim.weight=0`` gives the plain Bi-Real baseline.

``configs/imagenet.py:smoke`` shrinks it to a short CPU run (64x64 crops,
20 steps of 32, 256 evaluation images from the training split, 2 workers);
any folder of 1000 class folders of JPEGs of any size will do for it.
"""

from cmim_jax import default_config


def set_data(config):
  """ImageNet as every ImageNet config here reads it (this file's docstring)."""
  config.data.name = "imagenet2012"
  config.data.source = "auto"  # Shards, else an image folder, else tfds.
  config.data.pipeline = "stream"
  config.data.augment = "auto"  # 'host': random-resized crop + flip in the workers.
  config.data.image_size = 224
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  return config


def get_config(variant: str = ""):
  config = set_data(default_config.get_config())

  config.model.name = "birealnet18"
  # '' keeps the model's own quantizers (Bi-Real's; identity for birealnet18_fp).
  config.model.input_quantizer = ""
  config.model.kernel_quantizer = ""

  config.cmim.weight = 1.0  # Untuned (see the docstring).
  config.cmim.temperature = 0.1
  config.cmim.layers = "last:3"

  config.batch_size = 512
  config.num_epochs = 256.0
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.weight_decay = 5e-6
  config.lr_schedule = "linear"
  config.warmup_epochs = 0.0

  # 2502 steps per epoch at batch 512.
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2500
  config = default_config.apply_variant(config, variant)
  if variant == "smoke":
    config.data.workers = 2
  return config
