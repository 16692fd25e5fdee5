"""fused_mtl: fast, drop-in loss balancing for multi-task PyTorch models.

The public surface::

    fused_mtl.Balancer                  # the interface: total = balancer(losses), .weights
    fused_mtl.UncertaintyWeighting      # learned uncertainty (parameter log_vars)
    fused_mtl.GradNorm                  # gradient-norm balancing (parameter weights)
    fused_mtl.DWA                       # dynamic weight average (period loss ratios)
    fused_mtl.DTP                       # dynamic task prioritization (reported KPIs)
    fused_mtl.MGDA                      # min-norm point of the task gradients (and MGDA-UB)
    fused_mtl.EqualWeighting            # the plain sum, the baseline
    fused_mtl.synthetic                 # the GradNorm paper's toy multi-task regression
    fused_mtl.functional                # the same math on tensors
    fused_mtl.compat                    # drop-ins: AutomaticWeightedLoss, MultiNoiseLoss
    fused_mtl.reference                 # the math in plain torch (fallback and test oracle)

Not imported with the package: ``fused_mtl.demo`` (the experiment behind ``fused-mtl demo``),
``fused_mtl.benchmark_cases`` and ``fused_mtl.benchmark_report`` (the cases and reports of
``fused-mtl bench`` and ``pytest benchmarks/``), ``fused_mtl.cli`` (the ``fused-mtl`` command).

Triton is optional and imported only when a Triton kernel first runs.
"""

from fused_mtl import compat, functional, reference, synthetic
from fused_mtl.balancer import Balancer
from fused_mtl.dtp import DTP
from fused_mtl.dwa import DWA
from fused_mtl.equal import EqualWeighting
from fused_mtl.gradnorm import GradNorm
from fused_mtl.mgda import MGDA
from fused_mtl.uncertainty import UncertaintyWeighting

__all__ = [
    "DTP",
    "DWA",
    "MGDA",
    "Balancer",
    "EqualWeighting",
    "GradNorm",
    "UncertaintyWeighting",
    "__version__",
    "compat",
    "functional",
    "reference",
    "synthetic",
]
__version__ = "0.1.0"
