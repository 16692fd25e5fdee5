"""Time and peak memory of one Gram solver call at K tasks, in a fresh process.

python benchmarks/solver_cost.py METHOD K KIND   (KIND: well | rank)
Peak memory: the process's peak resident set (ru_maxrss) after the call minus before it.
"""

import resource
import sys
import time

import torch

from fused_mtl.reference import gram_weights as gw
from fused_mtl.reference import solvers, stochastic

method, K, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
if kind == "well":
    J = torch.randn(K, 4 * K, dtype=torch.float64)
else:
    J = torch.randn(K, K // 4, dtype=torch.float64) @ torch.randn(
        K // 4, 4 * K, dtype=torch.float64
    )
gram = J @ J.T  # float64, as the Gram methods now receive it
orders = gw.projection_orders(K)
calls = {
    "MGDA": lambda: solvers.min_norm_weights(gram),
    "UPGrad": lambda: gw.upgrad_weights(gram),
    "DualProj": lambda: gw.dualproj_weights(gram),
    "CAGrad": lambda: gw.cagrad_weights(gram, 0.4),
    "NashMTL": lambda: gw.fair_weights(gram, 1.0),
    "FairGrad": lambda: gw.fair_weights(gram, 2.0),
    "IMTLG": lambda: gw.imtl_g_weights(gram),
    "AlignedMTL": lambda: gw.aligned_mtl_weights(gram),
    "ConFIG": lambda: gw.config_weights(gram),
    "PCGrad": lambda: gw.pcgrad_weights(gram, orders),
    "GradVac": lambda: gw.gradvac_weights(gram, orders, torch.zeros(K, K), 0.5),
    "SDMGrad": lambda: stochastic.sdmgrad_lambdas(torch.full((K,), 1 / K), gram, 0.3, 20),
    "MoCo": lambda: stochastic.moco_lambdas(torch.full((K,), 1 / K), gram, 0.1, 0.0),
    "MoDo": lambda: stochastic.modo_lambdas(torch.full((K,), 1 / K), gram, 1e-3, 0.1),
}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = calls[method]()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
result = out[0] if isinstance(out, tuple) else out
finite = bool(torch.isfinite(result).all())
print(f"{method} K={K} {kind}: {elapsed:.2f} s, peak +{peak / 1024:.0f} MiB, finite={finite}")
