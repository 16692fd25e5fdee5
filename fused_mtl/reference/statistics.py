"""Weights from loss and metric statistics: GradNorm's rule, DWA, DTP.

GradNorm
--------
GradNorm (Chen et al., ICML 2018) learns task weights ``w`` from the gradient norms. With
``G_i = w_i ||g_i||``, ``G_mean = mean_i G_i``, training rates ``r_i = L~_i / mean_j L~_j``
where ``L~_i = L_i(t) / L_i(0)``, and the constant targets ``T_i = G_mean * r_i^alpha``, the
GradNorm loss ``sum_i |G_i - T_i|`` has the weight gradient ``sign(G_i - T_i) * ||g_i||``. A
task that trains slowly (``r_i > 1``) gets a target above the mean, and its weight grows.

Dynamic Weight Average
----------------------
DWA (Liu, Johns & Davison, CVPR 2019) weights the losses of period t by how fast each fell over
the two periods before: with ``L^_n(e)`` task n's mean training loss over period e,
``r_n = L^_n(t-1) / L^_n(t-2)`` and temperature T, ``w_i = K exp(r_i / T) / sum_n exp(r_n / T)``.
The weights sum to K; a task whose loss fell least gets the largest weight.

Dynamic Task Prioritization
---------------------------
DTP (Guo et al., ECCV 2018), at task level, weights each loss by a focal term of a key
performance indicator ``k_i`` in [0, 1] (accuracy, IoU, ...) smoothed over time:
``w_i = -(1 - k_i)^gamma_i log(k_i)``. A task that performs badly (small ``k_i``) is weighted up.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradnorm_weight_grad(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """GradNorm's gradient for the task weights: ``sign(w_i ||g_i|| - T_i) * ||g_i||``."""
    weighted_norms = weights * grad_norms
    loss_ratios = losses / initial_losses
    training_rates = loss_ratios / loss_ratios.mean()
    # The target is a constant of the GradNorm loss: it carries no gradient of its own.
    targets = weighted_norms.mean() * training_rates**alpha
    return torch.sign(weighted_norms - targets) * grad_norms


def renormalized_weights(weights: Tensor, min_weight: float) -> Tensor:
    """Weights rescaled to sum to K, each first raised to at least ``min_weight`` (> 0)."""
    positive = weights.clamp_min(min_weight)
    return positive * (weights.shape[0] / positive.sum())


def dwa_weights(last_means: Tensor, before_last_means: Tensor, temperature: float) -> Tensor:
    """DWA's weights from the mean losses of the last two periods (``t-1`` and ``t-2``)."""
    rates = last_means / before_last_means
    return rates.shape[0] * torch.softmax(rates / temperature, dim=0)


def dtp_weights(kpis: Tensor, gamma: Tensor, kpi_floor: float) -> Tensor:
    """DTP's focal weights ``-(1 - k)^gamma log k``; ``k`` is raised to ``kpi_floor`` first.

    Without the floor a KPI of 0 would give an infinite weight; with it the weight is at most
    ``-log(kpi_floor)``. A KPI of 1 gives a weight of 0 (1 for ``gamma = 0``: torch's 0^0 = 1).
    """
    kpis = kpis.clamp_min(kpi_floor)
    return -((1 - kpis) ** gamma) * torch.log(kpis)
