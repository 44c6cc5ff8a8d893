"""The C++ XLA FFI packed-conv kernel (cmim_jax.export.ffi): one layer against
an integer NumPy convolution, whole models bit for bit against the pure-JAX
path, each under every variant of the kernel this CPU runs (AVX-512, AVX2,
baseline: ``ffi.use_isa``, as ``CMIM_JAX_FFI_ISA`` forces them), the fusion
plan, the switches that force the pure path or a variant, and the fallback
when no compiler is there. Skips (with the reason) only where the kernel
cannot be built."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import models
from cmim_jax.export import ffi, infer
from tests.test_export import (_images, _input_shape, _tiny_model, np_conv_zero_padded, np_sign,
                               randomized_variables)


@pytest.fixture(scope="module")
def built():
  ok, why = ffi._load()  # pylint: disable=protected-access
  if not ok:
    pytest.skip(f"the C++ kernel could not be built here: {why}")


@pytest.fixture
def isas(built):
  """Every variant this CPU runs (best first); the best one again afterwards.
  A test compiles once and calls under each: the variant is read per call."""
  yield ffi.supported_isas()
  ffi.use_isa(None)


def test_every_variant_runs_here_or_is_named_missing(isas):
  # This repo's CI CPU has AVX-512: all three run there. Elsewhere a lower
  # best variant is fine, but each listed one must switch in and report itself.
  assert isas[-1] == "baseline" and isas == [v for v in ("avx512", "avx2", "baseline") if v in isas]
  long = {"avx512": "avx512-vpopcntdq", "avx2": "avx2-popcnt", "baseline": "baseline"}
  for isa in isas:
    ffi.use_isa(isa)
    assert ffi.status() == long[isa]


def _layer_case(rng, b, h, w, cin, cout, k, zeros=True):
  """Input, kernel signs, packed bits and alpha; ``k`` an int (k x k) or (kh, kw)."""
  kh, kw = (k, k) if isinstance(k, int) else k
  x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
  if zeros:  # +0.0 and -0.0 are +1, as binarize.sign
    x.flat[::7] = 0.0
    x.flat[3::11] = -0.0
  signs = rng.random((kh, kw, cin, cout)) < 0.5
  bits = infer.pack_bits_np(np.transpose(signs, (0, 1, 3, 2)))  # [kh, kw, cout, words]
  alpha = rng.uniform(0.1, 2.0, cout).astype(np.float32)
  return x, signs, bits, alpha


@pytest.mark.parametrize("cin,cout,k,strides,padding,hw", [
    (16, 16, 3, (1, 1), ((1, 1), (1, 1)), (7, 7)),       # uint16 words, two positions a register
    (16, 16, 3, (1, 1), ((1, 1), (1, 1)), (4, 2)),       # the same, no interior column
    (16, 16, (1, 9), (1, 1), ((0, 0), (4, 4)), (3, 12)),  # nine taps, not 3x3
    (12, 16, (9, 1), (1, 1), ((4, 4), (0, 0)), (12, 3)),
    (9, 12, 3, (2, 2), ((1, 1), (1, 1)), (9, 12)),       # the same at stride 2, cout < 16
    (32, 24, 3, (2, 2), ((1, 1), (1, 1)), (8, 9)),       # uint32, stride 2, odd width
    (40, 64, 3, (1, 1), ((1, 1), (1, 1)), (5, 6)),       # one uint64 word, 8 registers
    (24, 50, 3, (1, 1), ((1, 1), (1, 1)), (5, 6)),       # uint32, 4 registers, part of a chunk
    (40, 30, 3, (2, 2), ((1, 1), (1, 1)), (7, 6)),       # uint64, 4 registers, part of a chunk
    (5, 33, 3, (2, 2), ((1, 1), (1, 1)), (5, 6)),        # part of a word, cout past a register
    (48, 8, 1, (2, 2), ((0, 0), (0, 0)), (6, 6)),        # 1x1 shortcut-like, uint64
    (70, 40, 3, (1, 1), ((0, 2), (1, 0)), (5, 4)),       # two uint64 words, asymmetric pad
    (130, 17, 3, (1, 2), ((1, 1), (1, 1)), (4, 5)),      # three words, mixed strides
])
def test_layer_equals_integer_numpy_conv(isas, cin, cout, k, strides, padding, hw):
  """alpha * (the zero-padded +-1 convolution), one float32 rounding: exactly,
  under every kernel variant."""
  rng = np.random.default_rng(cin * 100 + cout)
  x, signs, bits, alpha = _layer_case(rng, 2, *hw, cin, cout, k)
  ref = np_conv_zero_padded(np_sign(x), np.where(signs, 1, -1), strides, padding)
  want = ref.astype(np.float32) * alpha
  words = ffi.kernel_words(bits, cin)
  layer = jax.jit(lambda x: ffi.bconv(x, words, alpha, cin=cin, strides=strides,
                                      padding=padding))
  for isa in isas:
    ffi.use_isa(isa)
    np.testing.assert_array_equal(np.asarray(layer(x)), want, err_msg=isa)
  # And the pure-JAX layer gives the same bits.
  border = infer.border_map(infer.kernel_sign_sums(bits, cin), hw, strides, padding)
  pure = infer.xnor_conv(jnp.asarray(x), bits, cin=cin, strides=strides, padding=padding,
                         border=border if any(v for p in padding for v in p) else None)
  np.testing.assert_array_equal(np.asarray(pure).astype(np.float32) * alpha, want)


def test_the_handler_refuses_a_malformed_epilogue(built):
  """One C++ handler serves the three call forms; operands that fit none of
  them (called directly, past bconv's own checks) are refused with a reason."""
  rng = np.random.default_rng(1)
  cin, cout = 16, 16
  x, _, bits, alpha = _layer_case(rng, 1, 4, 4, cin, cout, 3)
  words = ffi.kernel_words(bits, cin)
  vec = np.ones(cout, np.float32)
  out = jax.ShapeDtypeStruct((1, 4, 4, cout), jnp.float32)
  attrs = dict(cin=np.int64(cin), sh=np.int64(1), sw=np.int64(1), pt=np.int64(1), pl=np.int64(1),
               word_bits=np.int64(16))
  call = lambda *extra, clip=0: jax.ffi.ffi_call("cmim_bconv", out)(
      x, words, alpha, *extra, clip=np.int64(clip), **attrs)
  np.testing.assert_array_equal(np.asarray(call()), np.asarray(ffi.bconv(
      x, words, alpha, cin=cin, strides=(1, 1), padding=((1, 1), (1, 1)))))
  # Kernel words that are not kernel_words' for this cin (two uint16 words for 16 channels).
  two = np.concatenate([words, words], axis=2)
  with pytest.raises(Exception, match="kernel words do not match.*kernel_words"):
    jax.block_until_ready(jax.ffi.ffi_call("cmim_bconv", out)(x, two, alpha, clip=np.int64(0),
                                                              **attrs))
  for extra, clip, match in [((vec, vec), 0, "mean, mul and bias"),
                             ((vec, vec, vec), 1, "clip applies after a residual"),
                             ((vec, vec, vec[:3]), 0, "cout entries"),
                             ((vec, vec, vec, vec), 0, "the output's shape")]:
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(call(*extra, clip=clip))


@pytest.mark.parametrize("cin,cout,hw", [
    (32, 32, (6, 6)),
    (16, 16, (7, 7)),  # the stride-1 uint16 pair loop; an odd interior column left over
])
def test_fused_epilogue_equals_the_pure_ops(isas, cin, cout, hw):
  """BatchNorm, residual add and hardtanh in the call == the same ops in XLA, bit for bit."""
  rng = np.random.default_rng(0)
  x, _, bits, alpha = _layer_case(rng, 3, *hw, cin, cout, 3)
  mean, bias = (rng.normal(0, 3, cout).astype(np.float32) for _ in range(2))
  mul = (rng.uniform(0.05, 1.0, cout) * rng.choice([-1, 1], cout)).astype(np.float32)
  res = rng.normal(0, 0.7, (3, *hw, cout)).astype(np.float32)
  words = ffi.kernel_words(bits, cin)
  border = infer.border_map(infer.kernel_sign_sums(bits, cin), hw, (1, 1), ((1, 1), (1, 1)))
  kw = dict(cin=cin, strides=(1, 1), padding=((1, 1), (1, 1)))

  # The XLA ops one after the other, each result materialised, as the
  # program's layers run (in one jit XLA may also contract alpha's multiply
  # into the BatchNorm's subtract, which neither the training model's eval
  # forward nor the packed program does: checked end to end below and in
  # tests/test_export.py).
  v = jax.jit(lambda x: infer.xnor_conv(x, bits, border=border, **kw).astype(jnp.float32)
              * alpha)(x)
  y = jax.jit(lambda v: infer._batch_norm(v, mean, mul, bias))(v)  # pylint: disable=protected-access
  h = jax.jit(lambda y, r: jnp.clip(y + r, -1.0, 1.0))(y, res)
  r = jax.jit(lambda y, r: y + r)(y, res)  # residual, no hardtanh (Bi-Real Net's blocks)
  native = jax.jit(lambda x, res: (ffi.bconv(x, words, alpha, bn=(mean, mul, bias), **kw),
                                   ffi.bconv(x, words, alpha, bn=(mean, mul, bias), residual=res,
                                             clip=True, **kw),
                                   ffi.bconv(x, words, alpha, bn=(mean, mul, bias), residual=res,
                                             **kw)))
  for isa in isas:
    ffi.use_isa(isa)
    for want, got in zip((y, h, r), native(x, res)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=isa)


# One model per block kind: ResNet (option A shortcuts, stride 2), VGG-small
# (max pool between conv and BatchNorm: no fusion there), Bi-Real Net
# (real 1x1 shortcuts, no hardtanh), SD-BNN ImageNet (ASD shift), ReActNet-A
# (1x1 binary convs, RSign, RPReLU, concat).
@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "birealnet18", "resnet18_sdbnn",
                                  "reactnet_a_cifar"])
def test_models_ffi_equals_pure_bit_for_bit(isas, name, tmp_path):
  from cmim_jax import export
  model = _tiny_model(name)
  shape = _input_shape(model)
  variables = randomized_variables(model, shape)
  path = str(tmp_path / "m.cmimbnn")
  export.save(path, model, variables, model_name=name, input_shape=shape,
              mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
  native, pure = export.load(path, kernel="ffi"), export.load(path, kernel="pure")
  shifts = {l.get("shift") for l in native.program.layers if l["op"] == "bconv"}
  assert (name == "resnet18_sdbnn") == ("asd" in shifts)  # the ASD path is covered
  hlo = jax.jit(native.__call__).lower(_images(shape, n=2)[:1]).as_text()
  assert "cmim_bconv" in hlo
  assert "cmim_bconv" not in jax.jit(pure.__call__).lower(_images(shape, n=2)[:1]).as_text()
  native_fn, pure_fn = jax.jit(native.__call__), jax.jit(pure.__call__)
  for n in (1, 5):  # batch 1, and more (flat images: every border tap is a tie)
    images = _images(shape, n=max(n, 2))[:n]
    want = np.asarray(pure_fn(images))
    for isa in isas:  # one compiled program, each variant of the kernel
      ffi.use_isa(isa)
      got = np.asarray(native_fn(images))
      if name in _ROUNDING_AROUND_THE_CALL:
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1), err_msg=isa)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                                   err_msg=isa)
      else:
        np.testing.assert_array_equal(got, want, err_msg=isa)


# Bit for bit everywhere but here: with every layer on the pure path except
# the binary convs (themselves bit-identical, tests above) the logits of these
# two differ by about one ulp, because XLA compiles the float ops around a
# custom call into other fusions (its multiply-add contraction depends on
# what is fused). A flipped sign would move them by far more.
_ROUNDING_AROUND_THE_CALL = ("birealnet18", "reactnet_a_cifar")


def test_fusion_plan_keeps_intermediates_that_are_read():
  conv = {"op": "bconv", "name": "c", "src": "x", "dst": "y"}
  bn = {"op": "bn", "name": "b", "src": "y", "dst": "y"}
  add = {"op": "add", "name": "a", "src": "y", "src2": "x", "dst": "h"}
  act = {"op": "hardtanh", "name": "t", "src": "h", "dst": "h"}
  tail = {"op": "add", "name": "z", "src": "h", "src2": "h", "dst": "x"}
  assert ffi.fusion_plan([conv, bn, add, act, tail]) == [(0, 1, 2, 3), (4,)]
  # The BatchNorm's input is read again later: the conv stands alone.
  bn2 = dict(bn, dst="q")
  reuse = {"op": "add", "name": "r", "src": "y", "src2": "q", "dst": "x"}
  assert ffi.fusion_plan([conv, bn2, reuse]) == [(0,), (1,), (2,)]
  # A residual of the same register on both sides is not fused.
  assert ffi.fusion_plan([conv, bn, dict(add, src2="y")])[0] == (0, 1)


def test_env_switch_and_kernel_option_force_the_pure_path(built, monkeypatch, tmp_path):
  from cmim_jax import export
  model = _tiny_model("resnet20")
  shape = _input_shape(model)
  path = str(tmp_path / "m.cmimbnn")
  export.save(path, model, randomized_variables(model, shape), model_name="resnet20",
              input_shape=shape, mean=(0.5,) * 3, std=(0.25,) * 3)
  images = _images(shape, n=2)[:1]
  lowered = lambda m: jax.jit(m.__call__).lower(images).as_text()
  monkeypatch.delenv(ffi.ENV_SWITCH, raising=False)
  assert "cmim_bconv" in lowered(export.load(path))  # auto: the kernel on CPU
  assert "cmim_bconv" not in lowered(export.load(path, kernel="pure"))
  monkeypatch.setenv(ffi.ENV_SWITCH, "0")
  assert "cmim_bconv" not in lowered(export.load(path))
  assert ffi.status().startswith("off")
  with pytest.raises(ValueError, match="kernel='fast'"):
    export.load(path, kernel="fast")


def test_isa_switch_is_applied_on_load_and_bad_names_fail(isas, monkeypatch):
  monkeypatch.setenv(ffi.ISA_SWITCH, "avx2 ")  # case and spaces as a shell may leave them
  monkeypatch.setattr(ffi, "_ENV_APPLIED", False)
  if "avx2" in isas:
    assert ffi._load() == (True, "avx2-popcnt")  # pylint: disable=protected-access
  else:  # an explicit request for a variant the CPU lacks is an error, not a fallback
    with pytest.raises(RuntimeError, match="cannot run the 'avx2' kernel variant"):
      ffi._load()  # pylint: disable=protected-access
  ffi.use_isa(None)
  monkeypatch.setenv(ffi.ISA_SWITCH, "neon")
  monkeypatch.setattr(ffi, "_ENV_APPLIED", False)
  with pytest.raises(ValueError, match="CMIM_JAX_FFI_ISA='neon'.*avx512, avx2, baseline"):
    ffi._load()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="unknown kernel variant 'sse'"):
    ffi.use_isa("sse")
  monkeypatch.setenv(ffi.ISA_SWITCH, "auto")
  assert ffi._load() == (True, {"avx512": "avx512-vpopcntdq", "avx2": "avx2-popcnt",  # pylint: disable=protected-access
                                "baseline": "baseline"}[isas[0]])


def test_missing_compiler_fails_with_its_name_and_auto_falls_back(monkeypatch, tmp_path):
  monkeypatch.delenv(ffi.ENV_SWITCH, raising=False)
  monkeypatch.delenv("CMIM_JAX_FFI_CACHE", raising=False)
  monkeypatch.setenv("CMIM_JAX_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match="no-such-c[+][+]"):
    ffi.build("no-such-c++")
  # No shared object (whole or partial) is left behind; a cached one would
  # load without any compiler (native.build_once checks it first).
  assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".so")]
  # Where the build failed, "auto" runs the pure path and "ffi" says why.
  monkeypatch.setattr(ffi, "_load", lambda: (False, "no compiler"))
  program = infer.Program([{"op": "flatten", "name": "f"}], {}, (2, 2, 1), [0.5], [0.25])
  assert not program._use_ffi()  # pylint: disable=protected-access
  program.kernel = "ffi"
  with pytest.raises(RuntimeError, match="not available: unavailable: no compiler"):
    program._use_ffi()  # pylint: disable=protected-access


def test_the_build_is_keyed_by_every_source_file(monkeypatch, tmp_path):
  """An edit to an included part rebuilds (a new cached name), as one to the .cc does."""
  before = ffi.library_path("g++")
  assert all(os.path.exists(p) for p in ffi.INCLUDES)
  edited = tmp_path / os.path.basename(ffi.INCLUDES[-1])
  edited.write_bytes(open(ffi.INCLUDES[-1], "rb").read() + b"\n// edited\n")
  monkeypatch.setattr(ffi, "INCLUDES", (*ffi.INCLUDES[:-1], str(edited)))
  assert ffi.library_path("g++") != before


def test_kernel_words_are_the_same_bits():
  rng = np.random.default_rng(3)
  for cin in (3, 16, 17, 32, 33, 64, 100, 128):
    signs = rng.random((3, 3, 5 if cin != 128 else 8, cin)) < 0.5  # [kh, kw, cout, cin]
    bits = infer.pack_bits_np(signs)
    words = ffi.kernel_words(bits, cin)
    if words.ndim == 5:  # uint64 as uint32 pairs
      words = words.view("<u8")[..., 0]
    n = 8 * words.dtype.itemsize
    got = (words[..., None].astype(np.uint64) >> np.arange(n, dtype=np.uint64)) & 1
    got = np.transpose(got, (0, 1, 3, 2, 4)).reshape(3, 3, -1, words.shape[2] * n)[:, :, :signs.shape[2], :cin]
    np.testing.assert_array_equal(got.astype(bool), signs)
    assert words.shape[3] % (512 // n) == 0  # whole registers of output channels
