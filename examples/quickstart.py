"""Train a two-headed network with learned uncertainty weighting and watch it find the noise.

Two regression tasks share a trunk; their targets carry Gaussian noise of known variance (0.01 and
1.0). With Kendall et al.'s regression term ``0.5 exp(-s) L + 0.5 s``, the optimum of each
``s_i`` is ``log L_i``, so the learned variances ``sigma_i^2 = exp(s_i)`` approach each task's
mean squared error, which at convergence is its noise variance.

Run: ``python examples/quickstart.py [--steps N] [--device cpu|cuda]``
"""

import argparse

import torch
from torch import nn

from fused_mtl import UncertaintyWeighting

NOISE_VARIANCES = (0.01, 1.0)


def make_data(num_samples: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(num_samples, 8, generator=gen)
    w = torch.randn(8, 2, generator=gen)
    clean = torch.tanh(x @ w)
    targets = [
        clean[:, i] + variance**0.5 * torch.randn(num_samples, generator=gen)
        for i, variance in enumerate(NOISE_VARIANCES)
    ]
    return x, targets


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, 1) for _ in NOISE_VARIANCES])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(-1) for head in self.heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, targets = make_data(32768, gen)
    x, targets = x.to(args.device), [t.to(args.device) for t in targets]

    model = TwoHeads().to(args.device)
    # The drop-in swap: this line replaces a hand-written loss-combining module.
    balancer = UncertaintyWeighting(tasks=["clean", "noisy"], task_types="regression").to(
        args.device
    )
    optimizer = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": balancer.parameters(), "lr": 1e-2}], lr=3e-3
    )

    for step in range(1, args.steps + 1):
        batch = torch.randint(0, x.shape[0], (256,), generator=gen).to(args.device)
        predictions = model(x[batch])
        losses = {
            name: nn.functional.mse_loss(prediction, target[batch])
            for name, prediction, target in zip(balancer.tasks, predictions, targets, strict=True)
        }
        total = balancer(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == 1:
            mse = "  ".join(f"{name} mse {loss.item():.4f}" for name, loss in losses.items())
            print(f"step {step:5d}  total {total.item():8.4f}  {mse}")

    print()
    print(f"{'task':8s} {'true noise variance':>20s} {'learned sigma^2':>16s} {'weight':>8s}")
    for name, true, learned, weight in zip(
        balancer.tasks,
        NOISE_VARIANCES,
        (balancer.sigmas**2).tolist(),
        balancer.weights.tolist(),
        strict=True,
    ):
        print(f"{name:8s} {true:20.3f} {learned:16.3f} {weight:8.2f}")


if __name__ == "__main__":
    main()
