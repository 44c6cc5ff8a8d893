"""cmim_jax.models.torch_convert: the part of the PyTorch converters they share.

Each converter's own names are tested with its model (test_models_reactnet*,
test_models_sdbnn*, test_models_tv_resnet); these are the shared rules.
"""
import numpy as np
import pytest

from cmim_jax.models import torch_convert


def _place(name, value):
  if name == "skip.me":
    return torch_convert.DROP
  m = {"conv.weight": ("block/conv", "kernel", "oihw"), "bn.running_var": ("block/bn", "var", ""),
       "shift.bias": ("act", "gamma", "neg_channel")}.get(name)
  return None if m is None else (m[0], m[1], torch_convert.transform(value, m[2]))


def test_places_strips_and_splits_collections():
  rng = np.random.default_rng(0)
  w, var, bias = (rng.normal(size=(4, 3, 2, 2)), rng.uniform(size=(4,)),
                  rng.normal(size=(1, 4, 1, 1)))
  v = torch_convert.to_variables(
      {"module.conv.weight": w, "bn.running_var": var, "shift.bias": bias,
       "bn.num_batches_tracked": np.array(3), "skip.me": np.zeros(1)}, _place, "a test net")
  assert sorted(v) == ["batch_stats", "params"]
  np.testing.assert_array_equal(v["params"]["block"]["conv"]["kernel"], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["act"]["gamma"], -bias.ravel())
  np.testing.assert_array_equal(v["batch_stats"]["block"]["bn"]["var"], var)
  # Without running statistics there is no batch_stats collection.
  assert sorted(torch_convert.to_variables({"conv.weight": w}, _place, "a test net")) == [
      "params"]


def test_unknown_names_are_all_listed_as_given():
  with pytest.raises(ValueError, match=r"not parameters of a test net: \['module\.head\.w', "
                     r"'fc\.b'\]"):
    torch_convert.to_variables({"module.head.w": np.zeros(1), "conv.weight": np.zeros((1,) * 4),
                                "fc.b": np.zeros(1)}, _place, "a test net")


def test_transforms():
  x = np.arange(24.0).reshape(2, 3, 2, 2)
  assert torch_convert.transform(x, "oihw").shape == (2, 2, 3, 2)
  np.testing.assert_array_equal(torch_convert.transform(x[:, :, 0, 0], "transpose"),
                                x[:, :, 0, 0].T)
  np.testing.assert_array_equal(torch_convert.transform(np.ones((1, 3, 1, 1)), "channel"),
                                np.ones(3))
  assert torch_convert.transform(x, "") is x
  with pytest.raises(ValueError, match="unknown transform 'hwio'.*'oihw'"):
    torch_convert.transform(x, "hwio")
  assert torch_convert.batch_norm("bn1", "stem_bn") == {
      "bn1.weight": ("stem_bn", "scale", ""), "bn1.bias": ("stem_bn", "bias", ""),
      "bn1.running_mean": ("stem_bn", "mean", ""), "bn1.running_var": ("stem_bn", "var", "")}
