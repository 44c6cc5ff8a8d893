r"""SD-BNN's ImageNet ResNet-18 recipe (Xue et al. 2021): two stages, KD from an FP ResNet-34.

  python -m cmim_jax.main --config configs/imagenet_teacher.py --workdir runs/imagenet_teacher \
      --config.data.data_dir=/data/imagenet
  python -m cmim_jax.main --config configs/sdbnn_imagenet.py:stage1 \
      --workdir runs/sdbnn_imagenet_stage1 --config.data.data_dir=/data/imagenet
  python -m cmim_jax.main --config configs/sdbnn_imagenet.py:stage2 \
      --workdir runs/sdbnn_imagenet_stage2 --config.data.data_dir=/data/imagenet

``config.teacher`` defaults to ``runs/imagenet_teacher`` and stage 2's
``config.init_from`` to ``runs/sdbnn_imagenet_stage1``; override either on
the command line. Model ``birealnet18_sdbnn`` (``cmim_jax.models.sdbnn_imagenet``:
Bi-Real ResNet-18 units with ASD (reduction 8) before the sign, WSD kernels
with the clipped STE, PReLU after each add), equal to a PyTorch twin of the
official ``imagenet/birealnet.py``.

From the official code (its model file's docstring; no training script is
released): stage 1 from scratch with binary activations and real weights
(``kernel_quantizer='identity'``), stage 2 from stage 1's weights with both
binary; both stages Adam, lr 1e-3 decayed linearly to 0 over 256 epochs,
batch 512, a ResNet-34 teacher. Not stated there, taken from ReActNet's
released trainer, whose Bi-Real code SD-BNN's model file builds on: the loss
is KD alone at T = 1 (the KL to the teacher's softmax), L2 weight decay 1e-5
on convolution kernels (not the classifier) in stage 1 and 0 in stage 2.
Differences that remain: ReActNet's trainer steps its linear decay once per
epoch (here per step) and adds PCA lighting noise to
the random-resized crops (not here). Reported: 66.5 top-1 (stage 2), 67.6
with real weights (the paper's 32/1 row); this port has not been trained to
them.

``,smoke`` (``:stage1,smoke``, ``:stage2,smoke``) is a CPU run of seconds on
any image folder of 1000 classes, after ``configs/imagenet_teacher.py:smoke``
(two network stages of one block, widths 16 and 32: every kind of layer of the
full network, at a fraction of its compile time; 32x32 crops, 4 steps)::

  T=/tmp/teacher; S1=/tmp/stage1; D=--config.data.data_dir=/tmp/imagenet_like
  python -m cmim_jax.main --config configs/imagenet_teacher.py:smoke --workdir $T $D
  python -m cmim_jax.main --config configs/sdbnn_imagenet.py:stage1,smoke --workdir $S1 $D \
      --config.teacher=$T
  python -m cmim_jax.main --config configs/sdbnn_imagenet.py:stage2,smoke --workdir /tmp/stage2 \
      $D --config.teacher=$T --config.init_from=$S1
"""

from cmim_jax import default_config

STAGES = ("stage1", "stage2")


def get_config(arg: str = "stage1"):
  """ReActNet's two-step recipe (the same values, see its file) on ``birealnet18_sdbnn``."""
  stage, _, variant = (arg or "stage1").partition(",")
  if stage not in STAGES:
    raise ValueError(f"unknown SD-BNN ImageNet stage {stage!r}; known: {', '.join(STAGES)} "
                     "(e.g. --config configs/sdbnn_imagenet.py:stage2 or :stage1,smoke).")
  step = {"stage1": "step1", "stage2": "step2"}[stage]
  recipe = default_config.sibling_config(__file__, "reactnet_imagenet.py")
  config = recipe.get_config(f"{step},{variant}" if variant else step)
  config.model.name = "birealnet18_sdbnn"
  # Stage 1 has real weights (``kernel_quantizer='identity'``, set by the
  # recipe): the model then has no WSD 'a'; stage 2 adds it at 0.
  config.init_from = "runs/sdbnn_imagenet_stage1" if stage == "stage2" else ""
  return config
