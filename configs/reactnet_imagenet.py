r"""ReActNet's two-step ImageNet recipe for ReActNet-18 / Bi-Real-18, KD from an FP ResNet-34.

  python -m cmim_jax.main --config configs/imagenet_teacher.py --workdir runs/imagenet_teacher \
      --config.data.data_dir=/data/imagenet
  python -m cmim_jax.main --config configs/reactnet_imagenet.py:step1 \
      --workdir runs/reactnet_imagenet_step1 --config.data.data_dir=/data/imagenet
  python -m cmim_jax.main --config configs/reactnet_imagenet.py:step2 \
      --workdir runs/reactnet_imagenet_step2 --config.data.data_dir=/data/imagenet

``config.teacher`` defaults to ``runs/imagenet_teacher`` and step 2's
``config.init_from`` to ``runs/reactnet_imagenet_step1``. Model ``reactnet18``
(the Bi-Real-based ReActNet ResNet-18; ``--config.model.name=birealnet18``
in both steps for Bi-Real-18 under the same recipe), equal to PyTorch twins
of the official definitions (``tests/test_models_reactnet.py``).

From liuzechun/ReActNet ``resnet/{1_step1,2_step2}/`` (``train.py``
defaults, ``run.sh``'s 256-epoch line): step 1 binary activations with real
weights (its ``conv3x3``; here ``kernel_quantizer='identity'``), weight
decay 1e-5; step 2 both binary, weight decay 0, started from step 1's
checkpoint (``load_state_dict(strict=False)``; here ``config.init_from``);
both Adam lr 1e-3 decayed linearly to 0 over 256 epochs, batch 512, the loss
KD alone (its ``DistributionLoss``: cross entropy against the teacher's
softmax, the KL at T = 1 up to a constant), teacher torchvision's ResNet-34.
``run.sh``'s active line is the 128-epoch setting (lr 2.5e-3):
``--config.num_epochs=128 --config.learning_rate=2.5e-3``. Differences that
remain: its teacher is torchvision's pretrained ResNet-34, here one trained
by ``configs/imagenet_teacher.py``; its linear decay steps once per epoch (here per step); its crops add PCA
lighting noise (0.1; not here). Reported (the official README, "ReActNet
(Bi-Real based)"): 65.9 top-1; this port has not been trained to it.

``,smoke`` (``:step1,smoke``, ``:step2,smoke``) is a CPU run of seconds on
any image folder of 1000 classes, after ``configs/imagenet_teacher.py:smoke``
(two network stages of one block, widths 16 and 32: every kind of layer of the
full network, at a fraction of its compile time; 32x32 crops, 4 steps)::

  T=/tmp/teacher; S1=/tmp/step1; D=--config.data.data_dir=/tmp/imagenet_like
  python -m cmim_jax.main --config configs/imagenet_teacher.py:smoke --workdir $T $D
  python -m cmim_jax.main --config configs/reactnet_imagenet.py:step1,smoke --workdir $S1 $D \
      --config.teacher=$T
  python -m cmim_jax.main --config configs/reactnet_imagenet.py:step2,smoke --workdir /tmp/step2 \
      $D --config.teacher=$T --config.init_from=$S1
"""

from cmim_jax import default_config

STEPS = ("step1", "step2")


def get_config(arg: str = "step1"):
  step, _, variant = (arg or "step1").partition(",")
  if step not in STEPS:
    raise ValueError(f"unknown ReActNet step {step!r}; known: {', '.join(STEPS)} "
                     "(e.g. --config configs/reactnet_imagenet.py:step2 or :step1,smoke).")
  # configs/imagenet.py's data: random-resized crop (0.08-1) + flip.
  config = default_config.sibling_config(__file__, "imagenet.py").set_data(
      default_config.get_config())

  config.model.name = "reactnet18"
  config.model.input_quantizer = ""
  config.model.kernel_quantizer = "identity" if step == "step1" else ""

  config.objectives = "kd"
  config.kd.weight = 1.0
  config.kd.temperature = 1.0
  config.cmim.weight = 0.0
  config.teacher = "runs/imagenet_teacher"
  config.init_from = "runs/reactnet_imagenet_step1" if step == "step2" else ""

  config.batch_size = 512
  config.num_epochs = 256.0
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.lr_schedule = "linear"
  config.warmup_epochs = 0.0
  config.weight_decay = 1e-5 if step == "step1" else 0.0
  config.decay_kernels_only = True
  config.decay_dense_kernels = False  # Its decay covers 4-d/'conv' parameters: not the fc.

  # 2502 steps per epoch at batch 512.
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2500
  config = default_config.apply_variant(config, variant)
  if variant == "smoke":
    default_config.sibling_config(__file__, "imagenet_teacher.py").shrink(config)
  return config
