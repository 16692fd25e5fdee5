"""fused_mtl: fast, drop-in loss balancing for multi-task PyTorch models.

The public surface::

    fused_mtl.Balancer                  # the interface: total = balancer(losses), .weights
    fused_mtl.UncertaintyWeighting      # learned uncertainty (parameter log_vars)
    fused_mtl.GradNorm                  # gradient-norm balancing (parameter weights)
    fused_mtl.DWA                       # dynamic weight average (period loss ratios)
    fused_mtl.DTP                       # dynamic task prioritization (reported KPIs)
    fused_mtl.MGDA                      # min-norm point of the task gradients (and MGDA-UB)
    fused_mtl.EqualWeighting            # the plain sum, the baseline
    fused_mtl.PCGrad, GradVac, CAGrad,  # the Gram family: an update from the Gram matrix of
      IMTLG, AlignedMTL, UPGrad,        #   the per-task gradients (GramBalancer), and
      DualProj, ConFIG, NashMTL,        #   GradDrop, per coordinate of the gradients
      FairGrad, GradDrop
    fused_mtl.FAMO, RandomWeighting,    # loss-level: weights from the loss values alone (FAMO,
      GeometricMean, IMTLL, STCH        #   RLW, GLS, IMTL-L, smooth Tchebycheff)
    fused_mtl.MoCo, SDMGrad, MoDo,      # stochastic gradient methods, with state across steps
      ExcessMTL, DBMTL, CRMOGM,         #   (CRMOGM: any Gram method's weights, smoothed;
      AutoLambda                        #   AutoLambda: weights meta-learned on validation)
    fused_mtl.Krum, TrimmedMean         # robust aggregators: outlying task gradients left out
    fused_mtl.PBI, COSMOS, UWSO,        # loss-level: preference scalarisations, analytical UW,
      GO4Align                          #   task groups by their progress
    fused_mtl.NTKMTL                    # the tasks' NTK eigenvalues equalised (Gram family)
    fused_mtl.synthetic                 # the GradNorm paper's toy multi-task regression
    fused_mtl.functional                # the same math on tensors
    fused_mtl.compat                    # drop-ins: AutomaticWeightedLoss, MultiNoiseLoss
    fused_mtl.reference                 # the math in plain torch (fallback and test oracle)

Not imported with the package: ``fused_mtl.app.demo`` (the experiment behind ``fused-mtl demo``),
``fused_mtl.app.benchmark_cases`` and ``fused_mtl.app.benchmark_report`` (the cases and reports of
``fused-mtl bench`` and ``pytest benchmarks/``), ``fused_mtl.app.cli`` (the ``fused-mtl`` command).

Triton is optional and imported only when a Triton kernel first runs.
"""

from fused_mtl import compat, functional, reference, synthetic
from fused_mtl.balancer import Balancer, GramBalancer
from fused_mtl.methods import (
    COSMOS,
    CRMOGM,
    DBMTL,
    DTP,
    DWA,
    FAMO,
    IMTLG,
    IMTLL,
    MGDA,
    NTKMTL,
    PBI,
    STCH,
    UWSO,
    AlignedMTL,
    AutoLambda,
    CAGrad,
    ConFIG,
    DualProj,
    EqualWeighting,
    ExcessMTL,
    FairGrad,
    GeometricMean,
    GO4Align,
    GradDrop,
    GradNorm,
    GradVac,
    Krum,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    RandomWeighting,
    SDMGrad,
    TrimmedMean,
    UncertaintyWeighting,
    UPGrad,
)

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
    "Balancer",
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
    "GramBalancer",
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
    "__version__",
    "compat",
    "functional",
    "reference",
    "synthetic",
]
__version__ = "0.1.0"
