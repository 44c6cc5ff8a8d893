"""The packed layer program of the ResNets (:class:`cmim_jax.models.ResNet`).

One program per block kind (:func:`block_kind`), in the float operations and
order of the Flax block so that the packed eval forward matches it bit for bit:

* ``basic`` (``BasicBlock``): two bconv + BN + hardtanh, the shortcut added
  before the second hardtanh.
* ``bireal`` (``BiRealBlock``, CIFAR Bi-Real): a shortcut around each bconv.
* ``birealnet`` / ``reactnet`` / ``prelu`` (Bi-Real Net's ``BiRealNetBlock``,
  ReActNet's with RPReLU and SD-BNN ImageNet's with PReLU after each add).

after the FP stem (conv + BN, optional hardtanh and max pool); then global
average pooling, the optional head BN and ``fc``. Every shortcut kind of
:mod:`cmim_jax.models.resnet` packs (:func:`shortcut`).
"""
from __future__ import annotations

import functools
from typing import Any

from cmim_jax import layers
from cmim_jax.export.errors import NotExportableError
from cmim_jax.models import birealnet, resnet, sdbnn_imagenet


def build(b: Any, m: resnet.ResNet) -> None:
  """Emits ResNet ``m``'s program into the pack builder ``b``."""
  if m.stem not in resnet.STEMS:
    raise NotExportableError(f"model {b.model_name!r}: unknown stem {m.stem!r}")
  big = m.stem == "imagenet"
  b.conv("stem_conv", strides=2 if big else 1, padding=3 if big else 1)
  b.bn("stem_bn")
  if m.stem_act:
    b.op("hardtanh", "stem_act")
  if big:
    b.op("max_pool", "stem_pool", window=[3, 3], strides=[2, 2], padding=[[1, 1], [1, 1]])
  channels = m.widths[0]
  kind = block_kind(m.block_cls)
  for s, (blocks, width) in enumerate(zip(m.stage_sizes, m.widths), start=1):
    for i in range(1, blocks + 1):
      strides = 2 if (s > 1 and i == 1) else 1
      name = f"stage{s}_block{i}"
      if kind == "basic":
        b.bconv(f"{name}/conv1", strides=strides, padding=1, dst="h")
        b.bn(f"{name}/bn1", "h")
        b.op("hardtanh", f"{name}/act1", "h")
        b.bconv(f"{name}/conv2", strides=1, padding=1, src="h", dst="y")
        b.bn(f"{name}/bn2", "y")
        sc = shortcut(b, name, channels, width, strides, m.shortcut)
        b.op("add", f"{name}/add", "y", "x", src2=sc)
        b.op("hardtanh", f"{name}/act2")
      elif kind == "bireal":
        b.bconv(f"{name}/conv1", strides=strides, padding=1, dst="y")
        sc = shortcut(b, name, channels, width, strides, m.shortcut)
        b.bn(f"{name}/bn1", "y")
        b.op("add", f"{name}/add1", "y", "h", src2=sc)
        b.op("hardtanh", f"{name}/act1", "h")
        b.bconv(f"{name}/conv2", strides=1, padding=1, src="h", dst="y")
        b.bn(f"{name}/bn2", "y")
        b.op("add", f"{name}/add2", "y", "x", src2="h")
        b.op("hardtanh", f"{name}/act2")
      elif kind in ("birealnet", "reactnet", "prelu"):
        # Bi-Real Net: nothing after the adds; ReActNet: RPReLU after each;
        # SD-BNN ImageNet: PReLU after each.
        post = {"reactnet": b.rprelu, "prelu": b.prelu}.get(kind)
        b.bconv(f"{name}/conv1", strides=strides, padding=1, dst="y")
        sc = shortcut(b, name, channels, width, strides, m.shortcut)
        b.bn(f"{name}/bn1", "y")
        b.op("add", f"{name}/add1", "y", "h", src2=sc)
        if post:
          post(f"{name}/act1", "h")
        b.bconv(f"{name}/conv2", strides=1, padding=1, src="h", dst="y")
        b.bn(f"{name}/bn2", "y")
        b.op("add", f"{name}/add2", "y", "x", src2="h")
        if post:
          post(f"{name}/act2")
      else:
        raise NotExportableError(no_block_exporter(m, b.model_name))
      channels = width
  b.op("global_avg_pool", "pool")
  if m.head_bn:
    b.bn("head_bn")
  b.dense("fc")


_BLOCKS = (resnet.BasicBlock, resnet.BiRealBlock, birealnet.BiRealNetBlock)


def block_kind(block) -> str | None:
  """The packed layout of a ResNet block class, or None if there is none.

  ReActNet's block is ``partial(BiRealNetBlock, post_add=RPReLU)``, SD-BNN
  ImageNet's ``partial(BiRealNetBlock, post_add=PReLU)``; any other
  ``post_add`` (or other bound field) would change the forward pass, so only
  that exact partial is recognised.
  """
  if block is resnet.BasicBlock:
    return "basic"
  if block is resnet.BiRealBlock:
    return "bireal"
  if block is birealnet.BiRealNetBlock:
    return "birealnet"
  if (isinstance(block, functools.partial) and block.func is birealnet.BiRealNetBlock
      and not block.args and set(block.keywords) == {"post_add"}):
    post = block.keywords["post_add"]
    if post is None:
      return "birealnet"
    if post is layers.RPReLU:
      return "reactnet"
    if post is sdbnn_imagenet.PReLU:
      return "prelu"
  return None


def no_block_exporter(m: resnet.ResNet, model_name: str) -> str:
  """The refusal for a ResNet whose block has no packed program, naming the block and those that have."""
  block = m.block_cls
  if isinstance(block, functools.partial):  # e.g. BiRealNetBlock(post_add=SomeAct)
    options = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in block.keywords.items())
    block = f"{block.func.__name__}({options})"
  else:
    block = getattr(block, "__name__", block)
  return (f"model {model_name!r}: block {block} has no packed exporter "
          f"({', '.join(c.__name__ for c in _BLOCKS)} and "
          "BiRealNetBlock(post_add=RPReLU or PReLU) do).")


def shortcut(b: Any, name: str, cin: int, cout: int, strides: int, kind: str) -> str:
  """Emits the block's shortcut of register ``x``; returns the register holding it."""
  if strides == 1 and cin == cout:
    return "x"
  if kind == "binary":
    b.bconv(f"{name}/downsample", strides=strides, padding=0, dst="sc")
  elif kind == "real":
    b.conv(f"{name}/downsample", strides=strides, padding=0, dst="sc")
  elif kind == "avgpool_real":
    src = "x"
    if strides != 1:
      b.op("avg_pool", f"{name}/downsample_pool", "x", "sc", window=[strides, strides],
           strides=[strides, strides], padding=[[0, 0], [0, 0]])
      src = "sc"
    b.conv(f"{name}/downsample", strides=1, padding=0, src=src, dst="sc")
  elif kind == "option_a":
    extra = cout - cin
    b.op("option_a", f"{name}/shortcut", "x", "sc", stride=strides,
         channel_pad=[extra // 2, extra - extra // 2])
    return "sc"
  else:
    raise NotExportableError(f"model {b.model_name!r}: shortcut {kind!r} has no packed exporter")
  b.bn(f"{name}/downsample_bn", "sc")
  return "sc"
