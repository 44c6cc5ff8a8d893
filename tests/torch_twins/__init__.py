"""PyTorch twins of cmim_jax models, written from the authors' code, for parity tests."""
