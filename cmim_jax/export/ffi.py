"""The packed binary conv as one XLA FFI custom call on CPU (C++, built on first use).

At batch 1 on CPU a pure-JAX packed conv is ~12 separately dispatched XLA
operations (binarize, pack, pad, taps, XOR, popcount, sums, border, scale),
and for the small layers of a CIFAR ResNet-20 their fixed cost exceeds the
float convolution. :file:`bconv_ffi.cc` computes one whole layer (binarize +
pack of the float input, XNOR-popcount over the taps inside the image, the
scale, optionally the following BatchNorm) in one call, with the same
integer and the same float operations as :func:`cmim_jax.export.infer.xnor_conv`
and the program's BatchNorm, so the logits are equal bit for bit (tested).

Building: lazily, on first use, with the system's ``g++`` (``$CXX``) into a
cache directory (:func:`cache_dir`: ``$CMIM_JAX_CACHE/ffi``, default
``$XDG_CACHE_HOME/cmim_jax/ffi`` or ``~/.cache/cmim_jax/ffi``) under a name
keyed by the hash of the source, the compile command, the jaxlib version
and the machine, under a file lock, written to a temporary name and renamed
into place atomically. Chosen over building at install (``setup.py
ext_modules``) because the package stays pure Python (``pip install`` needs
no compiler, the wheel is the same everywhere), the headers come from the
jaxlib actually installed (an install-time build under pip's build isolation
may see another jaxlib, and the FFI ABI is checked against the running one),
and a jaxlib upgrade rebuilds by itself. The cost is one compile (~10-20 s)
on the first packed call on a machine. If there is no compiler or the build
or load fails, one warning is logged and every layer runs the pure-JAX path,
which is also the path on GPU/TPU and in ``jax.export`` artifacts.

Portability: compiled with ``-O3`` without ``-march``; the C++ picks an
AVX-512 (VPOPCNTDQ), AVX2+POPCNT or plain variant of the inner loop at run
time (``__builtin_cpu_supports``), so a cached build is valid on any CPU of
the architecture. ``-ffp-contract=off`` keeps every float operation rounded
once, as XLA does.

Forcing the pure path: ``CMIM_JAX_FFI=0`` in the environment, or
``export.load(path, kernel="pure")``. Forcing a lower variant of the kernel
(to test or time it on a CPU that has a better one):
``CMIM_JAX_FFI_ISA=avx2`` or ``baseline`` (``avx512``, or unset: the best
this CPU runs), read when the kernel is loaded; :func:`use_isa` switches it
later (it applies to already compiled programs: the variant is read on every
call).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmim_jax import native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bconv_ffi.cc")
# The files SOURCE includes (textually, from its directory): part of the build's key.
INCLUDES = tuple(os.path.join(os.path.dirname(SOURCE), f) for f in (
    "bconv_common.inc", "bconv_avx512.inc", "bconv_avx512_rows.inc"))
ENV_SWITCH = "CMIM_JAX_FFI"
ISA_SWITCH = "CMIM_JAX_FFI_ISA"
# The C++ variants (best first) by the number cmim_bconv_set_isa takes, and their log names.
ISAS = {"avx512": 2, "avx2": 1, "baseline": 0}
_ISA_LONG = {0: "baseline", 1: "avx2-popcnt", 2: "avx512-vpopcntdq"}
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-w")
_TARGET, _SYMBOL = "cmim_bconv", "CmimBConv"
log = logging.getLogger(__name__)


def disabled_by_env() -> bool:
  """True when ``CMIM_JAX_FFI`` is set to 0/false/off/no."""
  return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no")


def cache_dir() -> str:
  """The kernel's cache folder, :func:`cmim_jax.native.user_cache_dir` ``("ffi")``
  (``$CMIM_JAX_CACHE/ffi``; ``$CMIM_JAX_FFI_CACHE``, deprecated, still replaces it)."""
  return native.user_cache_dir("ffi")


def _compile_command(cxx: str, out: str) -> list[str]:
  return [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", out]


def library_path(cxx: str | None = None) -> str:
  """Where the shared object for these sources, compiler, jaxlib and machine lives."""
  import jaxlib
  cxx = cxx or os.environ.get("CXX", "g++")
  h = hashlib.sha256()
  for path in (SOURCE, *INCLUDES):
    with open(path, "rb") as f:
      h.update(f.read())
  h.update(" ".join(_compile_command(cxx, "")).encode())
  h.update(f"{jaxlib.__version__} {platform.machine()} {sys.platform}".encode())
  return os.path.join(cache_dir(), f"bconv_ffi-{h.hexdigest()[:16]}.so")


def build(cxx: str | None = None) -> str:
  """Compiles :data:`SOURCE` once into the cache and returns its path
  (:func:`native.build_once` checks for a cached build first, so one loads
  on a machine without a compiler).

  Raises:
    RuntimeError: no compiler, or it failed (its stderr in the message).
  """
  cxx = cxx or os.environ.get("CXX", "g++")

  def command(out):
    if shutil.which(cxx) is None:  # Looked up only when a build is needed.
      raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    return _compile_command(cxx, out)

  return native.build_once(library_path(cxx), command)


_LIB = None  # the loaded shared object (ctypes), once _load succeeded


def _isa_from_env() -> str | None:
  """``CMIM_JAX_FFI_ISA``'s variant name, None when unset or "auto".

  Raises:
    ValueError: an unknown name (the message lists the valid ones).
  """
  value = os.environ.get(ISA_SWITCH, "").strip().lower()
  if value in ("", "auto"):
    return None
  if value not in ISAS:
    raise ValueError(f"{ISA_SWITCH}={os.environ[ISA_SWITCH]!r} is not a kernel variant: use one "
                     f"of {', '.join(ISAS)} (or unset it for the best this CPU runs)")
  return value


@functools.lru_cache(maxsize=None)
def _build_and_register() -> tuple[bool, str]:
  """Builds, loads and registers the targets once: (ok, reason if not)."""
  global _LIB
  try:
    import ctypes
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")
    _LIB = lib
    return True, ""
  except Exception as e:  # pylint: disable=broad-except
    log.warning("cmim_jax.export: the C++ packed-conv kernel is not available (%s); "
                "binary layers run the pure-JAX path.", e)
    return False, str(e)


_ENV_APPLIED = False


def _load() -> tuple[bool, str]:
  """(ok, the variant in use or why the kernel is unavailable); on the first
  successful load, applies ``CMIM_JAX_FFI_ISA``.

  Raises:
    ValueError, RuntimeError: from :func:`use_isa` for a bad ``CMIM_JAX_FFI_ISA``
      (a variant that does not exist or that this CPU lacks: an explicit
      request is not silently replaced by another variant).
  """
  global _ENV_APPLIED
  wanted = _isa_from_env()  # an unknown name fails before any build
  ok, why = _build_and_register()
  if not ok:
    return False, why
  if not _ENV_APPLIED:
    if wanted is not None:
      use_isa(wanted)
    _ENV_APPLIED = True
  return True, _ISA_LONG[_LIB.cmim_bconv_isa()]


def supported_isas() -> list[str]:
  """The variants this CPU runs, best first (empty if the kernel is unavailable)."""
  if not _build_and_register()[0]:
    return []
  best = _LIB.cmim_bconv_best_isa()
  return [name for name, n in sorted(ISAS.items(), key=lambda kv: -kv[1]) if n <= best]


def use_isa(name: str | None) -> str:
  """Makes every kernel call from now on run variant ``name`` ("avx512",
  "avx2", "baseline"; None: the best this CPU runs) and returns the name of
  the one used before. All variants compute the same bits (tested).

  Raises:
    ValueError: an unknown name.
    RuntimeError: the kernel is unavailable, or this CPU lacks the variant.
  """
  if name is not None and name not in ISAS:
    raise ValueError(f"unknown kernel variant {name!r}: use one of {', '.join(ISAS)} or None")
  ok, why = _build_and_register()
  if not ok:
    raise RuntimeError(f"the C++ packed-conv kernel is not available: {why}")
  before = {n: k for k, n in ISAS.items()}[_LIB.cmim_bconv_isa()]
  want = _LIB.cmim_bconv_best_isa() if name is None else ISAS[name]
  if _LIB.cmim_bconv_set_isa(want) != 0:
    raise RuntimeError(f"this CPU cannot run the {name!r} kernel variant (it runs "
                       f"{', '.join(supported_isas())}); set {ISA_SWITCH} to one of those")
  return before


def available() -> bool:
  """Whether the CPU kernel can be used (built, loaded, not switched off)."""
  return not disabled_by_env() and _load()[0]


def status() -> str:
  """One line for logs and benchmarks: the variant in use, or why none."""
  if disabled_by_env():
    return f"off ({ENV_SWITCH}=0)"
  ok, what = _load()
  return what if ok else f"unavailable: {what}"


def kernel_words(bits: np.ndarray, cin: int) -> np.ndarray:
  """The kernel's ``uint32 [kh, kw, cout, words]`` bits as the C++ reads them.

  Words of 16 bits for ``cin <= 16``, 32 for ``cin <= 32``, 64 above (the
  same bit order: channel ``c`` is bit ``c % n`` of word ``c // n``, a
  little-endian reinterpretation of the uint32 words), laid out
  ``[kh, kw, words, cout']`` so the inner loop runs over output channels
  (``cout'``: cout rounded up to a multiple of 512 bits of words);
  64-bit words as ``uint32 [kh, kw, words, cout, 2]`` (low half first).
  """
  kh, kw, cout, w32 = bits.shape
  if cin <= 16:
    dtype, n = np.uint16, -(-cin // 16)
  elif cin <= 32:
    dtype, n = np.uint32, 1
  else:
    dtype, n = np.uint64, -(-cin // 64)
  b = np.zeros((kh, kw, cout, 2 * n if dtype is np.uint64 else max(w32, 1)), np.uint32)
  b[..., :w32] = bits
  words = b.astype("<u4").view(np.dtype(dtype).newbyteorder("<"))[..., :n]
  words = np.transpose(words, (0, 1, 3, 2)).astype(dtype)
  # Output channels zero-padded to whole 512-bit registers (the AVX-512 loop
  # reads them whole; the extra lanes are never stored).
  lanes = 64 // np.dtype(dtype).itemsize
  words = np.ascontiguousarray(np.pad(words, ((0, 0), (0, 0), (0, 0), (0, -cout % lanes))))
  if dtype is np.uint64:
    # As uint32 pairs (low word first): JAX without x64 truncates uint64.
    words = words.astype("<u8").view("<u4").reshape(*words.shape, 2).astype(np.uint32)
  return words


def bconv(x: jax.Array, words: np.ndarray, alpha: np.ndarray, *, cin: int,
          strides: Sequence[int], padding: Sequence[Sequence[int]],
          bn: tuple | None = None, residual: jax.Array | None = None,
          clip: bool = False) -> jax.Array:
  """``alpha * conv(sign(x), sign(w))`` (then ``(v - mean) * mul + bias``) via the C++ kernel.

  Args:
    x: float32 ``[b, h, w, cin]``.
    words: from :func:`kernel_words`.
    alpha: float32 ``[cout]``.
    cin, strides, padding: the layer's (padding ((top, bottom), (left, right))).
    bn: ``(mean, mul, bias)`` of a following BatchNorm to apply in the same call.
    residual: float32 of the output's shape, added after the BatchNorm (needs ``bn``).
    clip: then clip to [-1, 1] (hardtanh; needs ``residual``).

  Returns:
    float32 ``[b, ho, wo, cout]``, bit for bit the pure-JAX layer's value.
  """
  ok, why = _load()
  if not ok:
    raise RuntimeError(f"the C++ packed-conv kernel is not available: {why}")
  kh, kw = words.shape[:2]
  cout = int(np.shape(alpha)[0])
  word_bits = 64 if words.ndim == 5 else 8 * words.dtype.itemsize
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  out = jax.ShapeDtypeStruct((b, ho, wo, cout), jnp.float32)
  args = [x.astype(jnp.float32), words, alpha]
  if bn is not None:
    args += list(bn)
  if residual is not None:
    if bn is None:
      raise ValueError("bconv: a residual needs the BatchNorm before it (bn=...)")
    args.append(residual.astype(jnp.float32))
  elif clip:
    raise ValueError("bconv: clip applies after a residual add (residual=...)")
  return jax.ffi.ffi_call(_TARGET, out)(
      *args, cin=np.int64(cin), sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt),
      pl=np.int64(pl), word_bits=np.int64(word_bits), clip=np.int64(bool(clip)))


# --------------------------------------------------------------------------
# Running a packed program's layers through the kernel
# --------------------------------------------------------------------------

def _read_before_written(layers, start: int, reg: str) -> bool:
  """Whether a layer from ``start`` on reads register ``reg`` before one overwrites it."""
  for layer in layers[start:]:
    if reg in (layer.get("src", "x"), layer.get("src2")):
      return True
    if layer.get("dst", "x") == reg:
      return False
  return reg == "x"  # The program's result.


def fusion_plan(layers) -> list[tuple[int, ...]]:
  """Groups of layer indices, each run as one step: a group starting with a
  ``bconv`` is one kernel call that also applies the ``bn``, then the ``add``
  (residual), then the ``hardtanh`` that follow it where each reads only the
  previous one's result and that intermediate result is read by nothing else
  (it would otherwise have to exist in its register); every other layer is a
  group of its own."""
  plan, i, n = [], 0, len(layers)
  while i < n:
    group = [i]
    if layers[i]["op"] == "bconv":
      cur = layers[i].get("dst", "x")
      for op in ("bn", "add", "hardtanh"):
        j = group[-1] + 1
        if j >= n or layers[j]["op"] != op:
          break
        nxt = layers[j]
        reads = [nxt.get("src", "x")] + ([nxt["src2"]] if op == "add" else [])
        if cur not in reads or (op == "add" and reads[0] == reads[1]):
          break
        if nxt.get("dst", "x") != cur and _read_before_written(layers, j + 1, cur):
          break
        group.append(j)
        cur = nxt.get("dst", "x")
    plan.append(tuple(group))
    i = group[-1] + 1
  return plan


# kernel="auto" uses the kernel for every binary conv on CPU. Measured with
# bench/inference.py (README "Inference"): end to end it beat the pure-JAX
# program at batch 1 and 64 on ResNet-20 (1.6x, 1.44x) and ResNet-18 (1.75x,
# 1.09x). Per conv alone at batch 64, under a load average of 20+, it lost on
# most shapes (0.42-0.97x); a rule sending those calls to pure JAX made
# ResNet-18 at batch 64 slower end to end (3.74x against the float model
# instead of 4.93x), since the fused BatchNorm/residual/hardtanh are then lost
# too. So there is no per-shape rule.


def run_group(program, group, regs) -> jax.Array:
  """One :func:`fusion_plan` group starting with a bconv: the C++ kernel on
  CPU, the program's pure-JAX layers on any other platform."""
  from cmim_jax.export import infer  # pylint: disable=import-outside-toplevel
  conv = group[0]
  x = regs[conv.get("src", "x")]
  ops = [l["op"] for l in group]
  residual, res_reg = None, None
  if "add" in ops:
    add = group[ops.index("add")]
    prev = group[ops.index("add") - 1].get("dst", "x")
    res_reg = add["src2"] if add.get("src", "x") == prev else add.get("src", "x")
    residual = regs[res_reg]

  def pure(x, residual):
    local = dict(regs)
    local[conv.get("src", "x")] = x
    if res_reg is not None:
      local[res_reg] = residual
    for layer in group:
      local[layer.get("dst", "x")] = program.run_layer(layer, local)
    return local[group[-1].get("dst", "x")]

  def on_cpu(x, residual):
    bn = program.bn_terms(group[1]) if "bn" in ops else None
    return bconv(program.shifted_input(conv, x), program.kernel_words(conv),
                 program.array(conv, "alpha"), cin=conv["cin"], strides=conv["strides"],
                 padding=infer.padding_pairs(conv["padding"]), bn=bn, residual=residual,
                 clip="hardtanh" in ops)

  if residual is None:
    return jax.lax.platform_dependent(x, None, cpu=on_cpu, default=pure)
  return jax.lax.platform_dependent(x, residual, cpu=on_cpu, default=pure)
