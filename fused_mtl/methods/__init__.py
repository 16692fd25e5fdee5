"""The balancing methods, one thin module each: the paper's math in its docstring, its
configuration and state, and a call into the shared layers (``fused_mtl.balancer`` for the
interface, ``fused_mtl.ops`` for the per-task gradients and fused ops, ``fused_mtl.reference``
for the math)."""

from fused_mtl.methods.aligned_mtl import AlignedMTL
from fused_mtl.methods.auto_lambda import AutoLambda
from fused_mtl.methods.cagrad import CAGrad
from fused_mtl.methods.config import ConFIG
from fused_mtl.methods.cosmos import COSMOS
from fused_mtl.methods.cr_mogm import CRMOGM
from fused_mtl.methods.db_mtl import DBMTL
from fused_mtl.methods.dtp import DTP
from fused_mtl.methods.dualproj import DualProj
from fused_mtl.methods.dwa import DWA
from fused_mtl.methods.equal import EqualWeighting
from fused_mtl.methods.excess_mtl import ExcessMTL
from fused_mtl.methods.fairgrad import FairGrad
from fused_mtl.methods.famo import FAMO
from fused_mtl.methods.geometric_mean import GeometricMean
from fused_mtl.methods.go4align import GO4Align
from fused_mtl.methods.graddrop import GradDrop
from fused_mtl.methods.gradnorm import GradNorm
from fused_mtl.methods.gradvac import GradVac
from fused_mtl.methods.imtl_g import IMTLG
from fused_mtl.methods.imtl_l import IMTLL
from fused_mtl.methods.krum import Krum
from fused_mtl.methods.mgda import MGDA
from fused_mtl.methods.moco import MoCo
from fused_mtl.methods.modo import MoDo
from fused_mtl.methods.nash_mtl import NashMTL
from fused_mtl.methods.ntkmtl import NTKMTL
from fused_mtl.methods.pbi import PBI
from fused_mtl.methods.pcgrad import PCGrad
from fused_mtl.methods.random_weighting import RandomWeighting
from fused_mtl.methods.sdmgrad import SDMGrad
from fused_mtl.methods.stch import STCH
from fused_mtl.methods.trimmed_mean import TrimmedMean
from fused_mtl.methods.uncertainty import UncertaintyWeighting
from fused_mtl.methods.upgrad import UPGrad
from fused_mtl.methods.uw_so import UWSO

__all__ = [
    "COSMOS",
    "CRMOGM",
    "DBMTL",
    "DTP",
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "NTKMTL",
    "PBI",
    "STCH",
    "UWSO",
    "AlignedMTL",
    "AutoLambda",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EqualWeighting",
    "ExcessMTL",
    "FairGrad",
    "GO4Align",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "Krum",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "RandomWeighting",
    "SDMGrad",
    "TrimmedMean",
    "UPGrad",
    "UncertaintyWeighting",
]
