"""torchvision's ResNet definitions, importable where torchvision's compiled
extension is not.

The registry's torchvision wheels are CUDA builds: with the CPU torch of this
project's test environment their ``_C`` extension fails to load, and
``import torchvision`` then fails while registering fake kernels for the
missing detection ops (``torchvision::nms``). The ResNets are plain Python
modules that use none of those ops, so, when the normal import fails, this
loads ``torchvision/models/resnet.py`` from the installed package without
running the package's ``__init__`` (empty parent packages pointing at the
installed folders). The network definition is torchvision's own code in both
cases.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def resnet_module() -> types.ModuleType:
  """``torchvision.models.resnet``.

  Raises:
    ImportError: torchvision is not installed.
  """
  try:
    return importlib.import_module("torchvision.models.resnet")
  except (RuntimeError, OSError, ImportError) as e:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
      raise ImportError("torchvision is not installed") from e
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]  # The failed import's half-initialised modules.
  root = os.path.dirname(spec.origin)
  for name, path in (("torchvision", root), ("torchvision.models", os.path.join(root, "models"))):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
  return importlib.import_module("torchvision.models.resnet")
