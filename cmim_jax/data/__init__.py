"""The data package; ``cmim_jax.input_pipeline`` is its public face.

``catalogue`` (what is known per dataset), ``records`` (split and result
types), ``loaders/`` (one module per source), ``sources`` (dispatch),
``splits`` (tfds-style split strings), ``augment`` (host and device
augmentation, the per-example key scheme) and ``iterators`` (batches).
"""
