"""Test set-up: 8 simulated CPU devices, set before JAX starts."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never write into the user's compilation cache (~/.cache/cmim_jax);
# tests of the cache give it a temporary directory.
os.environ["CMIM_JAX_COMPILATION_CACHE"] = "0"
