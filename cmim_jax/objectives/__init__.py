"""Training objectives as composable terms, looked up by name from the config.

``config.objectives = 'ce,cmim'`` (comma-separated ``name[:weight]``; a term
without a weight takes ``config.<name>.weight`` when that section has one,
else 1; weight 0 leaves the term out). Built in: ``ce`` (cross entropy),
``cmim`` (the CMIM paper's InfoNCE on binary/real activation pairs) and
``kd`` (distillation from ``config.teacher``) and ``crd`` (CMIM's
released-code form: CRD-style contrast with a teacher through memory banks),
and the label-free ``moco`` (MoCo v2) and ``calibration`` (S2-BNN's guided
distribution calibration from a self-supervised teacher). See :mod:`.base` for the
protocol a term follows and ``README.md`` ("Objectives") for writing one.
"""

from cmim_jax.objectives.base import AUX_NEEDS
from cmim_jax.objectives.base import BuildContext
from cmim_jax.objectives.base import from_config
from cmim_jax.objectives.base import names
from cmim_jax.objectives.base import Objective
from cmim_jax.objectives.base import parse_spec
from cmim_jax.objectives.base import register
from cmim_jax.objectives.base import resolve_weights
from cmim_jax.objectives.base import Student
from cmim_jax.objectives.base import TEACHER_NEEDS
from cmim_jax.objectives.base import Term
from cmim_jax.objectives.base import term_key
# The built-in terms register themselves on import.
from cmim_jax.objectives import calibration  # pylint: disable=unused-import
from cmim_jax.objectives import ce  # pylint: disable=unused-import
from cmim_jax.objectives import cmim  # pylint: disable=unused-import
from cmim_jax.objectives import crd  # pylint: disable=unused-import
from cmim_jax.objectives import kd  # pylint: disable=unused-import
from cmim_jax.objectives import moco  # pylint: disable=unused-import
