"""fused_mtl: fast, drop-in loss balancing for multi-task PyTorch models.

The public surface::

    fused_mtl.UncertaintyWeighting      # the module (parameter log_vars)
    fused_mtl.functional                # the same math on tensors
    fused_mtl.compat                    # drop-ins: AutomaticWeightedLoss, MultiNoiseLoss
    fused_mtl.reference                 # the math in plain torch (fallback and test oracle)

Triton is optional and imported only when a Triton kernel first runs.
"""

from fused_mtl import compat, functional, reference
from fused_mtl.uncertainty import UncertaintyWeighting

__all__ = ["UncertaintyWeighting", "__version__", "compat", "functional", "reference"]
__version__ = "0.1.0"
