"""The balancing methods, one thin module each: the paper's math in its docstring, its
configuration and state, and a call into the shared layers (``fused_mtl.balancer`` for the
interface, ``fused_mtl.ops`` for the per-task gradients and fused ops, ``fused_mtl.reference``
for the math)."""

from fused_mtl.methods.aligned_mtl import AlignedMTL
from fused_mtl.methods.cagrad import CAGrad
from fused_mtl.methods.config import ConFIG
from fused_mtl.methods.dtp import DTP
from fused_mtl.methods.dualproj import DualProj
from fused_mtl.methods.dwa import DWA
from fused_mtl.methods.equal import EqualWeighting
from fused_mtl.methods.fairgrad import FairGrad
from fused_mtl.methods.graddrop import GradDrop
from fused_mtl.methods.gradnorm import GradNorm
from fused_mtl.methods.gradvac import GradVac
from fused_mtl.methods.imtl_g import IMTLG
from fused_mtl.methods.mgda import MGDA
from fused_mtl.methods.nash_mtl import NashMTL
from fused_mtl.methods.pcgrad import PCGrad
from fused_mtl.methods.uncertainty import UncertaintyWeighting
from fused_mtl.methods.upgrad import UPGrad

__all__ = [
    "DTP",
    "DWA",
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EqualWeighting",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "UncertaintyWeighting",
]
