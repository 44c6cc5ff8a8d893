"""cmim_jax: binary neural networks in JAX/Flax.

Layers, from the bottom up (nothing below imports anything above):

* ``identifiers``: the ``'name(key=value)'`` parser the registries share.
* ``binarize``: pure binarization functions with straight-through gradients.
* ``quantizers``: the registry naming them (``get('ste_sign(clip=1.5)')``).
* ``layers``: Flax binary layers built on them.
* ``models``: CIFAR/ImageNet BNN architectures and their FP twins.
* ``losses``: cross entropy, InfoNCE, the CMIM loss.
* ``train``: the per-device training step; ``loop``: the run driver around it.
* ``input_pipeline``, ``main``: data and the command line, at the edges.
"""

__version__ = "0.1.0"
