"""XLA flags that make training faster on some platforms; set before JAX starts.

XLA:CPU in jaxlib 0.10 runs convolution weight gradients through YNNPACK,
2-4x slower than Eigen for these networks (``bench/README.md`` has the
profile). Only the CPU backend reads the flag; other jaxlib versions may not
know it, so it is added only where it was measured. ``CMIM_JAX_NO_XLA_TUNING=1``
turns this off.
"""

import importlib.metadata
import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_MEASURED_JAXLIB = ("0.10.",)


def extra_flags(current: str = "") -> list[str]:
  """The flags to add to an XLA_FLAGS string ``current``."""
  if os.environ.get("CMIM_JAX_NO_XLA_TUNING"):
    return []
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return []
  if version.startswith(_MEASURED_JAXLIB) and "ynn_fusion_type" not in current:
    return [CPU_CONV_FLAG]
  return []


def apply() -> None:
  """Adds :func:`extra_flags` to ``os.environ['XLA_FLAGS']``; call before JAX starts."""
  current = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([current, *extra_flags(current)]).strip()
