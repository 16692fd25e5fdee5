"""Float64 references written from the papers' formulas, independently of fused_mtl.

Each function takes float64 tensors of shape (K,) and returns ``(value, magnitude)`` pairs: the
exact value and the sum of the absolute values of the parts it adds up. Rounding errors are
bounded relative to the magnitude (a sum of terms of both signs can cancel to a value much
smaller than its parts), so tests compare ``|got - value| <= rtol * magnitude``.

Gradients are written out by hand from the formulas, not taken from autograd.
"""

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Expected:
    total: Tensor
    total_magnitude: Tensor
    grad_losses: Tensor  # d total / d L_i, for an upstream gradient of 1
    grad_params: Tensor  # d total / d q_i
    grad_params_magnitude: Tensor


def log_variance(
    losses: Tensor, s: Tensor, a: Tensor | None = None, b: Tensor | None = None
) -> Expected:
    """Kendall et al.: term_i = a_i exp(-s_i) L_i + b_i s_i (a = b = 1 unless given)."""
    a = torch.ones_like(s) if a is None else a
    b = torch.ones_like(s) if b is None else b
    weighted = a * torch.exp(-s) * losses
    return Expected(
        total=(weighted + b * s).sum(),
        total_magnitude=(weighted.abs() + (b * s).abs()).sum(),
        grad_losses=a * torch.exp(-s),
        grad_params=-weighted + b,
        grad_params_magnitude=weighted.abs() + b.abs(),
    )


def liebel_koerner(losses: Tensor, p: Tensor) -> Expected:
    """Liebel & Koerner: term_i = 0.5 / p_i^2 L_i + log(1 + p_i^2)."""
    weighted = 0.5 / p**2 * losses
    regulariser = torch.log(1 + p**2)
    d_weighted = -losses / p**3
    d_regulariser = 2 * p / (1 + p**2)
    return Expected(
        total=(weighted + regulariser).sum(),
        total_magnitude=(weighted.abs() + regulariser.abs()).sum(),
        grad_losses=0.5 / p**2,
        grad_params=d_weighted + d_regulariser,
        grad_params_magnitude=d_weighted.abs() + d_regulariser.abs(),
    )


def dynamic_noise(losses: Tensor, eta: Tensor) -> Expected:
    """Dynamic Loss Weighting: term_i = L_i / eta_i^2 + log(eta_i)."""
    weighted = losses / eta**2
    regulariser = torch.log(eta)
    d_weighted = -2 * losses / eta**3
    d_regulariser = 1 / eta
    return Expected(
        total=(weighted + regulariser).sum(),
        total_magnitude=(weighted.abs() + regulariser.abs()).sum(),
        grad_losses=1 / eta**2,
        grad_params=d_weighted + d_regulariser,
        grad_params_magnitude=d_weighted.abs() + d_regulariser.abs(),
    )


# Kendall et al.'s exact terms: (a, b) per task type.
TASK_TYPE_COEFFICIENTS = {"regression": (0.5, 0.5), "classification": (1.0, 0.5)}


def awl_loop(losses: list[float], params: list[float]) -> float:
    """The AutomaticWeightedLoss snippet as users write it: a Python loop over tasks."""
    import math

    total = 0.0
    for loss, p in zip(losses, params, strict=True):
        total += 0.5 / p**2 * loss + math.log(1 + p**2)
    return total


def multi_noise_loop(losses: list[float], eta: list[float]) -> float:
    """The MultiNoiseLoss snippet as users write it: a Python loop over tasks."""
    import math

    total = 0.0
    for loss, e in zip(losses, eta, strict=True):
        total += loss / e**2 + math.log(e)
    return total


def _joined(task_grads: list[Tensor]) -> Tensor:
    """(K, P) float64: row i is task i's gradient over every parameter, joined."""
    return torch.cat([t.double().cpu().reshape(t.shape[0], -1) for t in task_grads], dim=1)


def gram(task_grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Gram of per-task gradients, M_ik = <g_i, g_k>, with g_i task i's gradient over every
    parameter joined into one vector; and its magnitude sum_p |g_ip| |g_kp|."""
    g = _joined(task_grads)
    return g @ g.T, g.abs() @ g.abs().T


def grad_norms(task_grads: list[Tensor]) -> Tensor:
    """||g_i||, the square root of the sum of squares of task i's gradient over every parameter."""
    g = _joined(task_grads)
    return g.square().sum(dim=1).sqrt()


def gradnorm_weight_grad(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """GradNorm (Chen et al. 2018), steps 1-3: d L_grad / d w_i = sign(G_i - T_i) ||g_i||.

    Returns the gradient and the gaps G_i - T_i (tests keep them away from zero, where the sign
    would be decided by rounding)."""
    weighted = weights * grad_norms  # G_i
    mean_weighted = weighted.mean()  # G bar
    loss_ratios = losses / initial_losses  # L~_i
    rates = loss_ratios / loss_ratios.mean()  # r_i
    targets = mean_weighted * rates**alpha  # T_i, a constant
    gaps = weighted - targets
    return torch.sign(gaps) * grad_norms, gaps


# --- DWA, DTP and the min-norm problem: plain Python floats and float64 tensors. ---


def dwa_history(steps, temperature, num_tasks):
    """DWA over a scripted history, from the paper's formula in plain Python floats.

    ``steps`` is a list of per-step loss lists, with the string ``"end"`` where a period ends.
    Returns the weights in force after each entry (a list of K floats per entry).
    """
    period, means, history = [], [], []
    weights = [1.0] * num_tasks
    for step in steps:
        if step == "end":
            means.append([sum(column) / len(period) for column in zip(*period, strict=True)])
            period = []
            if len(means) >= 2:
                rates = [last / before for last, before in zip(means[-1], means[-2], strict=True)]
                exps = [math.exp(r / temperature) for r in rates]
                weights = [num_tasks * e / sum(exps) for e in exps]
        else:
            period.append(step)
        history.append(list(weights))
    return history


def dtp_history(reports, gamma, decay, floor):
    """DTP weights after each KPI report: EMA (first report sets it), then -(1-k)^g log k."""
    average, history = None, []
    for kpis in reports:
        average = (
            list(kpis)
            if average is None
            else [decay * a + (1 - decay) * k for a, k in zip(average, kpis, strict=True)]
        )
        history.append(
            [
                -((1 - max(a, floor)) ** g) * math.log(max(a, floor))
                for a, g in zip(average, gamma, strict=True)
            ]
        )
    return history


def min_norm_exact(gram):
    """``min alpha^T M alpha`` over the simplex by enumerating supports (float64, small K).

    On a support S the minimum solves the KKT system ``M_SS alpha_S = mu 1, 1^T alpha_S = 1``;
    among the supports whose solution is non-negative, the smallest objective is the optimum.
    Singular systems (rank-deficient M) are solved by least squares, which gives a minimiser of
    the support's face when one exists; every candidate is checked for feasibility.
    Returns ``(objective, alpha)``.
    """
    gram = gram.double()
    k = gram.shape[0]
    best = None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            index = list(support)
            system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            system[:size, :size] = gram[index][:, index]
            system[:size, size] = -1
            system[size, :size] = 1
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1
            solution = torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.squeeze(1)
            if not torch.allclose(system @ solution, rhs, atol=1e-9):
                continue
            alpha = torch.zeros(k, dtype=torch.float64)
            alpha[index] = solution[:size]
            if (alpha < -1e-12).any():
                continue
            alpha = alpha.clamp_min(0)
            alpha = alpha / alpha.sum()
            objective = alpha @ gram @ alpha
            if best is None or objective < best[0]:
                best = (objective, alpha)
    return best
