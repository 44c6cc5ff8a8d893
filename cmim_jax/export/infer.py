"""XNOR-popcount inference of a packed binary network, in pure JAX.

Runs the layer program of a packed model (see :mod:`cmim_jax.export.pack`)
with ``jax.numpy``/``jax.lax`` only, so it lowers on CPU, GPU and TPU and can
be serialised with ``jax.export``. This module imports nothing from the rest
of cmim_jax: a packed file needs no training code.

Binary convolution. Activations are binarized (``x >= 0`` -> bit 1 = +1, as
``binarize.sign``) and packed along channels, 32 to a ``uint32`` word. For
each output position and channel the +-1 dot product over the taps inside the
image is ``n_valid * C - 2 * popcount(x XOR w)``. Padding: the training model
binarizes first and zero-pads after, so a padded tap contributes 0, neither
+1 nor -1. Here padded taps are packed as all-zero words (all -1), which adds
``-S[tap, o]`` for each of them, ``S[tap, o] = sum_c sign(w)[tap, c, o]``;
a per-layer border map ``sum over the padded taps of S`` (precomputed once
per input size) adds it back, so the result equals the zero-padded float
convolution exactly, integer for integer. Channel padding up to a multiple
of 32 uses zero bits in both the activations and the kernel, which XOR to 0
and are never counted.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
WORD_BITS = 32


# --------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------

def num_words(channels: int) -> int:
  return -(-channels // WORD_BITS)


def pack_bits(bits: Array) -> Array:
  """Packs booleans along the last axis into ``uint32`` words (bit c%32 of word c//32)."""
  c = bits.shape[-1]
  words = num_words(c)
  bits = jnp.asarray(bits, jnp.uint32)
  if words * WORD_BITS != c:
    pad = [(0, 0)] * (bits.ndim - 1) + [(0, words * WORD_BITS - c)]
    bits = jnp.pad(bits, pad)
  bits = bits.reshape(bits.shape[:-1] + (words, WORD_BITS))
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  # Distinct bits never carry, so the sum is the bitwise OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def pack_bits_np(bits: np.ndarray) -> np.ndarray:
  """NumPy twin of :func:`pack_bits` (used when exporting)."""
  c = bits.shape[-1]
  words = num_words(c)
  b = np.zeros(bits.shape[:-1] + (words * WORD_BITS,), np.uint64)
  b[..., :c] = bits
  b = b.reshape(bits.shape[:-1] + (words, WORD_BITS))
  return np.sum(b << np.arange(WORD_BITS, dtype=np.uint64), axis=-1).astype(np.uint32)


def stored_word_dtype(cin: int) -> np.dtype:
  """The word type a kernel of ``cin`` input channels is stored in (format
  version 2): uint8 / uint16 for at most 8 / 16 channels (the low bits of
  its one 32-bit word), uint32 otherwise; one bit per weight either way."""
  return np.dtype(np.uint8 if cin <= 8 else np.uint16 if cin <= 16 else np.uint32)


def narrow_words(words: np.ndarray, cin: int) -> np.ndarray:
  """:func:`pack_bits_np`'s words in their stored type (:func:`stored_word_dtype`);
  the same bits, read back by widening."""
  return words.astype(stored_word_dtype(cin), copy=False)


def unpack_bits_np(words: np.ndarray, channels: int) -> np.ndarray:
  """Inverse of :func:`pack_bits_np`: booleans ``[..., channels]``."""
  w = words.astype(np.uint64)[..., None] >> np.arange(WORD_BITS, dtype=np.uint64)
  bits = (w & 1).astype(bool).reshape(words.shape[:-1] + (words.shape[-1] * WORD_BITS,))
  return bits[..., :channels]


def binarize_pack(x: Array) -> Array:
  """Float activations -> packed sign bits (``x >= 0`` is +1, as in training)."""
  return pack_bits(x >= 0)


# --------------------------------------------------------------------------
# The XNOR-popcount convolution
# --------------------------------------------------------------------------

def _out_size(size: int, k: int, stride: int, lo: int, hi: int) -> int:
  return (size + lo + hi - k) // stride + 1


def border_map(kernel_sign_sums: np.ndarray, in_hw: Sequence[int],
               strides: Sequence[int], padding: Sequence[Sequence[int]]) -> np.ndarray:
  """Per output position, the sum of ``S[tap, o]`` over the taps that fall on padding.

  Args:
    kernel_sign_sums: ``S``, int ``[kh, kw, cout]``: per tap, the sum over
      input channels of the kernel's signs.
    in_hw: input height and width.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    int32 ``[ho, wo, cout]``.
  """
  kh, kw, cout = kernel_sign_sums.shape
  (pt, pb), (pl, pr) = padding
  h, w = in_hw
  inside = np.zeros((h + pt + pb, w + pl + pr), bool)
  inside[pt:pt + h, pl:pl + w] = True
  ho = _out_size(h, kh, strides[0], pt, pb)
  wo = _out_size(w, kw, strides[1], pl, pr)
  out = np.zeros((ho, wo, cout), np.int64)
  for i in range(kh):
    for j in range(kw):
      padded = ~inside[i:i + (ho - 1) * strides[0] + 1:strides[0],
                       j:j + (wo - 1) * strides[1] + 1:strides[1]]
      out += padded[:, :, None].astype(np.int64) * kernel_sign_sums[i, j][None, None, :]
  return out.astype(np.int32)


def kernel_sign_sums(bits: np.ndarray, cin: int) -> np.ndarray:
  """``S[i, j, o] = sum_c sign(w)[i, j, c, o]`` from packed ``[kh, kw, cout, words]`` bits."""
  ones = np.unpackbits(bits.view(np.uint8), axis=-1).sum(axis=-1)  # channel-pad bits are 0
  return (2 * ones.astype(np.int64) - cin).astype(np.int32)


def xnor_conv(x: Array, bits: Array, *, cin: int, strides: Sequence[int],
              padding: Sequence[Sequence[int]], border: Array | None) -> Array:
  """The +-1 convolution of ``sign(x)`` with a packed kernel, as int32.

  Args:
    x: float ``[b, h, w, cin]``, binarized here.
    bits: uint32 ``[kh, kw, cout, words]`` packed kernel signs (or uint8 /
      uint16 holding a narrow layer's one word: :func:`narrow_words`).
    cin: real input channels (the rest of the last word is zero bits).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), zero padding after binarization.
    border: int32 ``[ho, wo, cout]`` from :func:`border_map`, or None without padding.

  Returns:
    int32 ``[b, ho, wo, cout]``: exactly ``conv(sign(x), sign(w))`` with zero padding.
  """
  kh, kw, cout, words = bits.shape
  bits = bits.astype(np.uint32)  # A narrow layer's stored words, widened.
  if x.shape[-1] != cin:
    raise ValueError(f"xnor_conv: input has {x.shape[-1]} channels, the kernel {cin}")
  xp = binarize_pack(x)
  (pt, pb), (pl, pr) = padding
  if pt or pb or pl or pr:
    xp = jnp.pad(xp, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  b, hp, wp, _ = xp.shape
  sh, sw = strides
  ho = (hp - kh) // sh + 1
  wo = (wp - kw) // sw + 1
  # [kh, kw, words, cout]: the output channel minor, so that each (tap, word)
  # term is an elementwise XOR + popcount over output channels, which XLA
  # fuses into one vectorised loop over the whole output. (Reducing over a
  # minor axis of words instead was 2-10x slower: an inner loop of 2-16.)
  bits_t = (np.transpose(bits, (0, 1, 3, 2)) if isinstance(bits, np.ndarray)
            else jnp.transpose(bits, (0, 1, 3, 2)))
  if words == 1:
    # With one word the elementwise sum below is a small fusion, which XLA
    # copies into every reader of its result: in a residual network each
    # block output feeds the next conv and the next shortcut add, and the
    # copies compound block after block (ResNet-20 ran 2x slower than its
    # float twin). As a reduction over a major taps axis the result is
    # materialised once, still vectorised over output channels.
    taps = jnp.stack([xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, 0]
                      for i in range(kh) for j in range(kw)])
    w = bits_t[:, :, 0].reshape(kh * kw, 1, 1, 1, cout)
    mismatches = jnp.sum(jax.lax.population_count(taps[..., None] ^ w).astype(jnp.int32), axis=0)
  else:
    mismatches = None
    for i in range(kh):
      for j in range(kw):
        tap = xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
        for k in range(words):
          m = jax.lax.population_count(tap[..., k:k + 1] ^ bits_t[i, j, k]).astype(jnp.int32)
          mismatches = m if mismatches is None else mismatches + m
  dot = kh * kw * cin - 2 * mismatches
  if border is not None:
    dot = dot + border
  return dot


# --------------------------------------------------------------------------
# The layer program
# --------------------------------------------------------------------------

def padding_pairs(p) -> tuple[tuple[int, int], tuple[int, int]]:
  return tuple(tuple(int(v) for v in q) for q in p)  # type: ignore[return-value]


def bn_multipliers(bns: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> list[np.ndarray]:
  """``rsqrt(var + eps) * scale`` of each BatchNorm, computed at run time on the device.

  ``flax.linen.BatchNorm`` computes this product at run time from its
  variables; XLA folding it at compile time from constants (as it would in
  the packed program) rounds ``rsqrt`` differently in the last bit, and a
  last-bit change can flip a downstream sign. So it is computed here, once,
  by a jitted function that takes the variances as arguments, on the default
  backend (the one the training model's eval forward would use).
  """
  if not bns:
    return []
  fn = jax.jit(lambda vs, ss, es: [jax.lax.rsqrt(v + e) * s for v, s, e in zip(vs, ss, es)])
  out = fn([jnp.asarray(v, jnp.float32) for v, _, _ in bns],
           [jnp.asarray(s, jnp.float32) for _, s, _ in bns],
           [jnp.float32(e) for _, _, e in bns])
  return [np.asarray(m) for m in out]


def _batch_norm(x, mean, mul, bias):
  # flax.linen.BatchNorm's eval operations in its order, ``(x - mean) * mul
  # + bias`` (not a fused ``a * x + b``, which rounds differently), so that
  # the values the next layer binarizes match the training model's.
  return (x - mean) * mul + bias


def _asd(x, a):
  pooled = jnp.mean(x, axis=(1, 2))
  h = jax.nn.relu(jnp.dot(pooled, a["fc1"]))
  shift = jax.nn.sigmoid(jnp.dot(h, a["fc2"]))
  return x + shift[:, None, None, :]


def _rprelu(x, gamma, slope, zeta):
  # layers.RPReLU's operations in its order: the result feeds the next sign,
  # so a reassociated form could flip a bit.
  x = x - gamma
  return jnp.where(x >= 0, x, slope * x) + zeta


def _avg_pool(x, window, strides, padding):
  y = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *window, 1), (1, *strides, 1),
                            ((0, 0), *padding, (0, 0)))
  return y / np.prod(window)


def _max_pool(x, window, strides, padding):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                               ((0, 0), *padding, (0, 0)))


class Program:
  """A packed model's layer list bound to its arrays; ``__call__`` is jittable.

  Args:
    layers: the manifest's layer list (dicts with ``op``, ``name``, ``src``,
      ``dst`` and op attributes).
    arrays: ``{'<layer name>/<key>': np.ndarray}``.
    input_shape: (H, W, C) of one image.
    mean, std: per-channel normalisation on the 0..1 scale.
    kernel: how binary convs run on CPU: ``"auto"`` (the C++ FFI kernel of
      :mod:`cmim_jax.export.ffi` if it builds and ``CMIM_JAX_FFI`` is not 0,
      else pure JAX), ``"ffi"`` (the kernel; raises if it cannot be built)
      or ``"pure"``. Off CPU, binary convs always run pure JAX.
  """

  def __init__(self, layers: Sequence[Mapping[str, Any]], arrays: Mapping[str, np.ndarray],
               input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
               kernel: str = "auto"):
    if kernel not in KERNELS:
      raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    self.kernel = kernel
    self._plan: list[tuple[int, ...]] | None = None  # ffi.fusion_plan, built on first use
    self._ffi_words: dict[str, np.ndarray] = {}      # kernel_words(), per layer
    self.layers = [dict(l) for l in layers]
    self.arrays = dict(arrays)
    self.input_shape = tuple(int(v) for v in input_shape)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self._borders: dict[tuple[str, int, int], np.ndarray] = {}
    bns = [l for l in self.layers if l["op"] == "bn"]
    muls = bn_multipliers([(self.array(l, "var"), self.array(l, "scale"), float(l["eps"])) for l in bns])
    self._bn_mul = {l["name"]: m for l, m in zip(bns, muls)}

  def array(self, layer, key):
    """The layer's array ``key`` (``bits``, ``alpha``, ``mean``, ...)."""
    return self.arrays[f"{layer['name']}/{key}"]

  def _border(self, layer, hw) -> np.ndarray | None:
    pad = padding_pairs(layer["padding"])
    if not any(v for p in pad for v in p):
      return None
    key = (layer["name"], int(hw[0]), int(hw[1]))
    if key not in self._borders:
      sums = kernel_sign_sums(self.array(layer, "bits"), layer["cin"])
      self._borders[key] = border_map(sums, hw, layer["strides"], pad)
    return self._borders[key]

  def normalize(self, images: Array) -> Array:
    """uint8 (or 0..255 float) images -> the float input the model was trained on."""
    # The data pipeline's formula (cmim_jax.data.augment.normalize), same op order.
    return images.astype(jnp.float32) * (1.0 / (255.0 * self.std)) - self.mean / self.std

  def __call__(self, images: Array) -> Array:
    """Logits ``f32[B, classes]`` of uint8 NHWC images."""
    return self.forward(self.normalize(images))

  def forward(self, x: Array) -> Array:
    """Logits of already normalised float32 NHWC images."""
    if tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"packed model expects images of shape (B, {', '.join(map(str, self.input_shape))}), "
                       f"got {tuple(x.shape)}")
    regs = {"x": jnp.asarray(x, jnp.float32)}
    if self._use_ffi():
      from cmim_jax.export import ffi  # pylint: disable=import-outside-toplevel
      if self._plan is None:
        self._plan = ffi.fusion_plan(self.layers)
      for group in self._plan:
        first, last = self.layers[group[0]], self.layers[group[-1]]
        # Each layer's operations carry its name in the compiled program's
        # metadata (profiles attribute time per layer: bench/inference.py).
        with jax.named_scope(first["name"]):
          if first["op"] == "bconv":
            regs[last.get("dst", "x")] = ffi.run_group(self, [self.layers[i] for i in group], regs)
          else:
            regs[first.get("dst", "x")] = self.run_layer(first, regs)
      return regs["x"]
    for layer in self.layers:
      with jax.named_scope(layer["name"]):
        regs[layer.get("dst", "x")] = self.run_layer(layer, regs)
    return regs["x"]

  def _use_ffi(self) -> bool:
    if self.kernel == "pure":
      return False
    from cmim_jax.export import ffi  # pylint: disable=import-outside-toplevel
    if self.kernel == "ffi":
      if not ffi._load()[0]:  # pylint: disable=protected-access
        raise RuntimeError(f"kernel='ffi': the C++ kernel is not available: {ffi.status()}")
      return True
    return ffi.available()

  def bn_terms(self, layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``bn`` layer's (mean, mul, bias): ``(x - mean) * mul + bias``."""
    return self.array(layer, "mean"), self._bn_mul[layer["name"]], self.array(layer, "bias")

  def shifted_input(self, layer, x: Array) -> Array:
    """A ``bconv``'s input after its optional input shift (SD-BNN's ASD)."""
    shift = layer.get("shift")
    if shift == "asd":
      return _asd(x, {"fc1": self.array(layer, "shift_fc1"), "fc2": self.array(layer, "shift_fc2")})
    if shift is not None:
      raise ValueError(f"layer {layer['name']!r}: unknown input shift {shift!r} "
                       f"(known: {BCONV_SHIFTS})")
    return x

  def kernel_words(self, layer) -> np.ndarray:
    """The ``bconv``'s kernel as the C++ kernel reads it (:func:`ffi.kernel_words`), made once."""
    from cmim_jax.export import ffi  # pylint: disable=import-outside-toplevel
    if layer["name"] not in self._ffi_words:
      self._ffi_words[layer["name"]] = ffi.kernel_words(self.array(layer, "bits"), layer["cin"])
    return self._ffi_words[layer["name"]]

  def run_layer(self, layer, regs) -> Array:
    """One layer of the program on the registers ``regs`` (pure JAX); its result."""
    op = layer["op"]
    x = regs[layer.get("src", "x")]
    name = layer["name"]
    a = lambda key: self.array(layer, key)
    if op == "bconv":
      x = self.shifted_input(layer, x)
      dot = xnor_conv(x, a("bits"), cin=layer["cin"], strides=layer["strides"],
                      padding=padding_pairs(layer["padding"]), border=self._border(layer, x.shape[1:3]))
      return dot.astype(jnp.float32) * a("alpha")
    if op == "conv":
      return jax.lax.conv_general_dilated(
          x, a("kernel"), window_strides=tuple(layer["strides"]),
          padding=padding_pairs(layer["padding"]), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if op == "bn":
      return _batch_norm(x, *self.bn_terms(layer))
    if op == "channel_add":
      # ReActNet's RSign shift, as layers.RSign adds it (float32 + float32).
      return x + a("bias")
    if op == "rprelu":
      return _rprelu(x, a("gamma"), a("slope"), a("zeta"))
    if op == "hardtanh":
      return jnp.clip(x, -1.0, 1.0)
    if op == "add":
      return x + regs[layer["src2"]]
    if op == "concat":  # Along channels: ReActNet-A's doubling blocks.
      return jnp.concatenate([x, regs[layer["src2"]]], axis=-1)
    if op == "max_pool":
      return _max_pool(x, layer["window"], layer["strides"], padding_pairs(layer["padding"]))
    if op == "avg_pool":
      return _avg_pool(x, layer["window"], layer["strides"], padding_pairs(layer["padding"]))
    if op == "option_a":
      s = layer["stride"]
      y = x[:, ::s, ::s, :]
      return jnp.pad(y, ((0, 0), (0, 0), (0, 0), tuple(layer["channel_pad"])))
    if op == "global_avg_pool":
      return jnp.mean(x, axis=(1, 2))
    if op == "flatten":
      return x.reshape(x.shape[0], -1)
    if op == "dense":
      y = jnp.dot(x, a("kernel"))
      return y + a("bias") if layer.get("bias", True) else y
    raise ValueError(f"layer {name!r}: unknown op {op!r}")


KERNELS = ("auto", "ffi", "pure")
OPS = ("bconv", "conv", "bn", "hardtanh", "add", "max_pool", "avg_pool", "option_a",
       "global_avg_pool", "flatten", "dense", "channel_add", "rprelu", "concat")
# Values of a bconv layer's optional "shift" attribute (None: no shift).
BCONV_SHIFTS = (None, "asd")
