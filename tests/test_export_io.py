"""Packed export at the edges: the file format's errors, a run directory, the
command line, and the jax.export artifact run without cmim_jax."""
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import checkpointing, export, layers, models
from cmim_jax.export import fileformat, pack
from cmim_jax.models import birealnet

from test_export import _images, randomized_variables
from test_paths import FakeGCS, fake_bucket  # pylint: disable=unused-import (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)  # digits


def _tiny_resnet20():
  return models.get_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = _tiny_resnet20()
  variables = randomized_variables(model, SHAPE)
  path = str(tmp_path_factory.mktemp("packed") / "m.cmimbnn")
  export.save(path, model, variables, model_name="resnet20", input_shape=SHAPE,
              mean=(0.3,), std=(0.4,))
  return path, model, variables


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_full_precision_model_is_refused_by_name(tmp_path):
  model = models.get_model("resnet20_fp", num_classes=10, stage_sizes=(1, 1, 1))
  with pytest.raises(pack.NotExportableError, match=r"'resnet20_fp' is full precision"):
    export.save(str(tmp_path / "x.cmimbnn"), model, randomized_variables(model, SHAPE),
                model_name="resnet20_fp", input_shape=SHAPE, mean=(0.5,), std=(0.5,))
  assert not os.path.exists(tmp_path / "x.cmimbnn")


def test_checkpoint_that_does_not_match_the_model(tmp_path):
  model = _tiny_resnet20()
  other = models.get_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1), widths=(16, 32, 48))
  with pytest.raises(ValueError, match=r"does not match model 'resnet20'.*has shape \(48,\), the model wants \(64,\)"):
    export.save(str(tmp_path / "x.cmimbnn"), model, randomized_variables(other, SHAPE),
                model_name="resnet20", input_shape=SHAPE, mean=(0.5,), std=(0.5,))


def _rewrite_manifest(src, dst, **changes):
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      if item.filename == fileformat.MANIFEST:
        data = json.dumps({**json.loads(data), **changes}).encode()
      zout.writestr(item, data)


def test_future_format_version_is_refused_by_number(saved, tmp_path):
  path = str(tmp_path / "future.cmimbnn")
  _rewrite_manifest(saved[0], path, format_version=fileformat.FORMAT_VERSION + 1)
  with pytest.raises(export.ExportFileError,
                     match=rf"format version {fileformat.FORMAT_VERSION + 1} is newer.*upgrade"):
    export.load(path)


def test_version_1_file_with_uint32_words_still_loads_and_computes_the_same(saved, tmp_path):
  """Format 2 stores a <= 16-channel layer's words as uint16; a version-1 file
  (uint32 words everywhere) still loads, and both give the same logits."""
  manifest, arrays = fileformat.load(saved[0])
  old = {k: v.astype(np.uint32) if k.endswith("/bits") else v for k, v in arrays.items()}
  assert any(v.dtype != old[k].dtype for k, v in arrays.items())
  body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "arrays")}
  fileformat.save(str(tmp_path / "v2.cmimbnn"), body, old)
  path = str(tmp_path / "v1.cmimbnn")
  _rewrite_manifest(str(tmp_path / "v2.cmimbnn"), path, format_version=1)
  images = np.random.default_rng(0).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
  for kernel in ("pure", "auto"):
    np.testing.assert_array_equal(np.asarray(export.load(path, kernel=kernel)(images)),
                                  np.asarray(export.load(saved[0], kernel=kernel)(images)))


def test_bits_of_the_wrong_type_or_shape_are_refused_naming_the_layer(saved, tmp_path):
  manifest, arrays = fileformat.load(saved[0])
  body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "arrays")}
  layer = next(l for l in manifest["layers"] if l["op"] == "bconv" and l["cin"] <= 16)
  key = f"{layer['name']}/bits"
  for bad, why in [(arrays[key].astype(np.uint8), "uint8"),          # cin 16 > 8
                   (arrays[key].astype(np.float32), "float32"),
                   (arrays[key][:, :, :-1], "uint16")]:               # a column short
    path = str(tmp_path / f"bad_{why}.cmimbnn")
    fileformat.save(path, body, {**arrays, key: bad})
    with pytest.raises(export.ExportFileError,
                       match=rf"layer '{layer['name']}' \(cin {layer['cin']}\) has packed kernel "
                             rf"bits {why}.*Re-export"):
      export.load(path)


def test_files_are_stamped_with_the_lowest_version_their_arrays_need():
  wide = {"a/bits": np.zeros((3, 3, 4, 1), np.uint32), "a/alpha": np.ones(4, np.float32)}
  assert fileformat.required_version(wide) == 1  # older readers keep reading it
  assert fileformat.required_version({**wide, "b/bits": np.zeros((3, 3, 4, 1), np.uint16)}) == 2
  assert fileformat.required_version({"b/bits": np.zeros((1, 1, 4, 1), np.uint8)}) == 2


def test_other_format_and_unknown_op_are_refused(saved, tmp_path):
  path = str(tmp_path / "other.cmimbnn")
  _rewrite_manifest(saved[0], path, format="something_else")
  with pytest.raises(export.ExportFileError, match="not a cmim_jax packed model"):
    export.load(path)
  manifest, _ = fileformat.load(saved[0])
  layers = [dict(l) for l in manifest["layers"]]
  layers[0]["op"] = "teleport"
  _rewrite_manifest(saved[0], path, layers=layers)
  with pytest.raises(export.ExportFileError, match="'teleport'"):
    export.load(path)
  # A future attribute that changes what an existing op computes is refused
  # too, not ignored.
  layers = [dict(l) for l in manifest["layers"]]
  first_bconv = next(i for i, l in enumerate(layers) if l["op"] == "bconv")
  layers[first_bconv]["shift"] = "rotate"
  _rewrite_manifest(saved[0], path, layers=layers)
  with pytest.raises(export.ExportFileError, match="input shift 'rotate'"):
    export.load(path)


def test_truncated_and_corrupt_files_get_a_clear_error(saved, tmp_path):
  data = open(saved[0], "rb").read()
  truncated = tmp_path / "truncated.cmimbnn"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(export.ExportFileError, match="truncated or corrupt"):
    export.load(str(truncated))
  # Flip one byte inside the packed bits of a binary conv.
  with zipfile.ZipFile(saved[0]) as z:
    info = z.getinfo("arrays/stage2_block1/conv1/bits.npy")
  offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
  corrupt = bytearray(data)
  corrupt[offset] ^= 0x40
  (tmp_path / "corrupt.cmimbnn").write_bytes(bytes(corrupt))
  with pytest.raises(export.ExportFileError, match=r"stage2_block1/conv1/bits.*corrupt"):
    export.load(str(tmp_path / "corrupt.cmimbnn"))
  (tmp_path / "junk.cmimbnn").write_bytes(b"not a zip at all")
  with pytest.raises(export.ExportFileError, match="not a readable archive"):
    export.load(str(tmp_path / "junk.cmimbnn"))
  with pytest.raises(FileNotFoundError, match="no packed model"):
    export.load(str(tmp_path / "missing.cmimbnn"))


def test_manifest_describes_the_model(saved):
  manifest, arrays = fileformat.load(saved[0])
  assert manifest["format_version"] == fileformat.FORMAT_VERSION
  assert manifest["model_name"] == "resnet20"
  assert manifest["input_shape"] == list(SHAPE)
  assert manifest["mean"] == [0.3] and manifest["std"] == [0.4]
  bconvs = [l for l in manifest["layers"] if l["op"] == "bconv"]
  assert len(bconvs) == 6  # two per block, one block per stage
  for l in bconvs:  # One bit per weight: uint16 words for the 16-channel stage.
    bits = arrays[f"{l['name']}/bits"]
    assert bits.dtype == (np.uint16 if l["cin"] <= 16 else np.uint32), l
    assert bits.shape == (3, 3, l["cout"], -(-l["cin"] // 32))
  assert {arrays[f"{l['name']}/bits"].dtype for l in bconvs} == {np.dtype(np.uint16),
                                                                  np.dtype(np.uint32)}


# --------------------------------------------------------------------------
# A run directory, the command line, and serving without cmim_jax
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory as training leaves it: an orbax checkpoint of the full
  train state (with optimizer state) and config.json."""
  from configs import digits
  config = digits.get_config()
  config.model.name = "resnet20"
  config.model.stage_sizes = (1, 1, 1)
  workdir = tmp_path_factory.mktemp("run")
  model = models.get_model("resnet20", num_classes=10, stage_sizes=(1, 1, 1))
  variables = randomized_variables(model, SHAPE, seed=5)
  state = {"step": np.int32(7), "params": {"model": variables["params"]},
           "batch_stats": variables["batch_stats"],
           "opt_state": {"mu": jax.tree.map(np.zeros_like, variables["params"])},
           "rng": np.zeros((2,), np.uint32)}
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  ckpt.save(7, state)
  ckpt.close()
  (workdir / "config.json").write_text(config.to_json())
  return str(workdir), config, model, variables


def test_export_workdir_restores_without_optimizer_and_matches(workdir, tmp_path):
  wd, config, model, variables = workdir
  out = str(tmp_path / "run.cmimbnn")
  result = export.export_workdir(wd, out)
  assert result.step == 7 and result.model_name == "resnet20"
  assert result.float_bytes > 10 * result.packed_bytes > 0  # 1 block per stage: 15x
  packed = export.load(out)
  assert packed.manifest["dataset"] == "digits" and packed.manifest["input_shape"] == [8, 8, 1]
  r = export.compare(packed, model, variables, _images(SHAPE, n=8))
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"] + 1e-6, r
  # A config naming another model than the checkpoint holds.
  wrong = config.copy_and_resolve_references()
  wrong.model.name = "vgg_small"
  with pytest.raises(ValueError, match="vgg_small"):
    export.export_workdir(wd, str(tmp_path / "wrong.cmimbnn"), config=wrong)
  wrong.model.name = "resnet20_sdbnn"  # same layout, plus ASD and WSD parameters
  with pytest.raises(ValueError, match=r"checkpoint does not match model 'resnet20_sdbnn'.*missing"):
    export.export_workdir(wd, str(tmp_path / "wrong.cmimbnn"), config=wrong)
  assert not os.path.exists(tmp_path / "wrong.cmimbnn")


def test_export_skips_a_damaged_newest_checkpoint_read_only(workdir, tmp_path, monkeypatch):
  """The export reads through the run's Checkpointer: a truncated newest step
  falls back to the newest intact one with a warning, and the run directory
  is left untouched (it may still be training)."""
  from absl import logging
  from test_checkpoint_damage import truncate_data
  src, config, model, variables = workdir
  wd = tmp_path / "run"
  shutil.copytree(src, wd)
  newer = randomized_variables(model, SHAPE, seed=6)
  ckpt = checkpointing.Checkpointer(str(wd), async_save=False)
  ckpt.save(8, {"step": np.int32(8), "params": {"model": newer["params"]},
                "batch_stats": newer["batch_stats"],
                "opt_state": {"mu": jax.tree.map(np.zeros_like, newer["params"])},
                "rng": np.zeros((2,), np.uint32)})
  ckpt.close()
  assert export.restore_variables(str(wd))[1] == 8
  truncate_data(str(wd / "checkpoints" / "8"))
  seen = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: seen.append(msg % a))
  result = export.export_workdir(str(wd), str(tmp_path / "m.cmimbnn"))
  assert result.step == 7
  assert [w for w in seen if w.startswith("Checkpoint step 8")], seen
  assert sorted(os.listdir(wd / "checkpoints")) == ["7", "8"]
  assert not (wd / "checkpoints.damaged").exists()
  r = export.compare(export.load(result.path), model, variables, _images(SHAPE))
  assert r["argmax_agree"] == 1.0 and r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"] + 1e-6, r
  with pytest.raises(checkpointing.CheckpointError, match="step 8"):
    export.export_workdir(str(wd), str(tmp_path / "x.cmimbnn"), step=8)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    export.restore_variables(str(tmp_path / "empty"))
  assert not (tmp_path / "empty").exists()


def test_remote_workdir_without_gcsfs_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  if checkpointing.paths._backend_available("gcs"):  # pylint: disable=protected-access
    pytest.skip("gcsfs (or TensorFlow) is installed here")
  with pytest.raises(checkpointing.paths.RemotePathError, match=r"cmim_jax\[cloud\]"):
    export.restore_variables("gs://bucket/runs/x")
  assert os.listdir(tmp_path) == []  # no local directory called gs:


def test_export_reads_a_remote_workdir_through_paths(fake_bucket, tmp_path, monkeypatch):
  """A gs:// workdir goes to orbax as the bucket path, read-only."""
  monkeypatch.chdir(tmp_path)
  FakeGCS().mkdir("gs://bucket/runs/x/checkpoints")
  seen = {}

  class Manager:  # orbax's tensorstore cannot reach the in-memory bucket
    def __init__(self, directory, options=None, item_handlers=None):
      seen["directory"], seen["read_only"] = os.fspath(directory), options.read_only

    def all_steps(self):
      return []

    def wait_until_finished(self):
      pass

    def close(self):
      pass

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", Manager)
  with pytest.raises(FileNotFoundError, match="no checkpoint in gs://bucket/runs/x/checkpoints"):
    export.restore_variables("gs://bucket/runs/x")
  assert seen == {"directory": "gs://bucket/runs/x/checkpoints", "read_only": True}
  assert os.listdir(tmp_path) == []


def _run(args, cwd, env=None):
  proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def test_cli_check_and_jax_export_run_without_cmim_jax(workdir, tmp_path):
  wd, _, _, _ = workdir
  out, hlo = str(tmp_path / "m.cmimbnn"), str(tmp_path / "m.jaxexport")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  stdout = _run([sys.executable, "-m", "cmim_jax.export", "--workdir", wd, "--out", out,
                 "--check", "--stablehlo", hlo], REPO, env)
  assert "resnet20: float32" in stdout and "MiB" in stdout
  assert "argmax identical on 297/297" in stdout and ": OK" in stdout, stdout

  images = _images(SHAPE, n=5)
  np.save(tmp_path / "images.npy", images)
  want = np.asarray(jax.jit(export.load(out).__call__)(jnp.asarray(images)))
  # The editable install puts cmim_jax on the path through a meta-path finder
  # (site-packages/__editable___cmim_jax_*_finder.py), so removing directories
  # from sys.path is not enough: mark the package unimportable instead.
  script = textwrap.dedent("""
      import sys
      sys.modules["cmim_jax"] = None
      try:
        import cmim_jax.export
        raise SystemExit("cmim_jax is importable")
      except ImportError:
        pass
      import numpy as np
      from jax import export
      exported = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
      x = np.load(sys.argv[2])
      np.save(sys.argv[3], np.asarray(exported.call(x)))
      np.save(sys.argv[4], np.asarray(exported.call(x[:2])))  # symbolic batch
      assert not [m for m in sys.modules if m.startswith("cmim_jax.")]
  """)
  (tmp_path / "serve.py").write_text(script)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  _run([sys.executable, "serve.py", hlo, "images.npy", "logits.npy", "logits2.npy"],
       str(tmp_path), {**env, "JAX_PLATFORMS": "cpu"})
  got = np.load(tmp_path / "logits.npy")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.load(tmp_path / "logits2.npy"), want[:2], rtol=1e-6, atol=1e-6)


def test_half_binary_and_unknown_architectures_are_refused_by_name():
  weights_only = models.get_model("resnet20", num_classes=10, input_quantizer="identity")
  with pytest.raises(pack.NotExportableError, match=r"'resnet20' binarizes only its kernels"):
    pack.check_exportable(weights_only, "resnet20")

  # A Bi-Real block with an activation after the add other than ReActNet's RPReLU.
  other_act = models.get_model("birealnet18", num_classes=10, block_cls=functools.partial(
      birealnet.BiRealNetBlock, post_add=layers.RSign))
  with pytest.raises(pack.NotExportableError,
                     match=r"'odd': block BiRealNetBlock\(post_add=RSign\) has no packed exporter"):
    pack.check_exportable(other_act, "odd")

  class Mine(nn.Module):  # a model the packed format does not describe
    input_quantizer: str = "ste_sign"
    kernel_quantizer: str = "ste_sign"
    dtype: object = jnp.float32

    def __call__(self, x, *, train=False):
      return x

  with pytest.raises(pack.NotExportableError, match=r"'mine' \(Mine\) has no packed exporter"):
    pack.check_exportable(Mine(), "mine")


def test_bench_inference_smoke():
  """The benchmark runs and its last line is the JSON it documents."""
  proc = subprocess.run(
      [sys.executable, "bench/inference.py", "--model", "resnet20", "--batch_sizes", "2",
       "--repeats", "1", "--no_layers", "--profile_sessions", "2", "--profile_rounds", "2",
       "--profile_batches", "2"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["model"] == "resnet20" and result["memory"]["binary_kernels_ratio"] > 29
  (row,) = result["end_to_end"]
  assert row["batch"] == 2 and row["argmax_agree"] == 1.0 and row["packed_ms"] > 0
  # Per binary layer inside the forward: all 18 of ResNet-20's binary convs
  # found in both programs' profiles (their scopes matched).
  rows = result["layers_in_model"]
  assert len(rows) == 18 and {r["batch"] for r in rows} == {2}
  assert all(r["float_us"] > 0 and r.get("ffi_us", 1) > 0 for r in rows)
  assert all(r["cached_us"] > 0 for r in rows)
  if "ffi_us" in rows[0]:
    assert set(result["in_model_speedup"]["2"]) == {"ffi_speedup", "ffi_speedup_vs_cached"}
