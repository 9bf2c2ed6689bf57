"""The per-element training loss (the `loss` group): mse (the default), l1, and the pseudo-Huber loss with a
constant or timestep-dependent threshold.

Each returns the element-wise loss of prediction vs target; the objective (engine/objective.py) multiplies
it by the mask weights, averages it per sample, and weights each sample by `loss_weighting` (Min-SNR, the SD3
weightings), so every loss combines with every weighting and with masks.

Pseudo-Huber with threshold c: 2c (sqrt(r^2 + c^2) - c), r = prediction - target. It is quadratic (r^2) for
|r| << c and linear (2c|r|) for |r| >> c, and tends to r^2, the MSE, as c grows. Written as
2c r^2 / (sqrt(r^2 + c^2) + c) -- the same value -- so that a large c does not cancel digits.

Timestep-dependent thresholds (kohya-ss sd-scripts' `huber_schedule`; the formulas below are restated from
its documented behaviour): at little noise the loss is near-MSE (c -> 1), at much noise it is near-L1 (c -> delta):
- `exponential`: c(t) = delta ** (t / (N - 1)), t the timestep index of N;
- `snr`: c(t) = (1 - delta) / (1 + sigma_t)^2 + delta with sigma_t = 1 / sqrt(SNR(t)) (the noise-to-signal ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElementLoss:
    kind: str = "mse"                # mse | l1 | huber
    delta: float = 0.1               # huber threshold c (or its value at the most noise, for a schedule)
    schedule: str = "constant"       # huber: constant | exponential | snr

    def threshold(self, schedule, indices: torch.Tensor) -> torch.Tensor:
        """c per sample, shaped (B,)."""
        if self.schedule == "constant":
            return torch.full(indices.shape, float(self.delta), device=indices.device)
        if self.schedule == "exponential":
            fraction = indices.float() / max(schedule.num_train_timesteps - 1, 1)
            return torch.pow(torch.tensor(float(self.delta), device=indices.device), fraction)
        sigma = schedule.snr(indices).float().clamp_min(1e-20).rsqrt()
        return (1.0 - self.delta) / (1.0 + sigma) ** 2 + self.delta

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, schedule, indices: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return (prediction - target) ** 2
        if self.kind == "l1":
            return (prediction - target).abs()
        c = self.threshold(schedule, indices).to(prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
        squared = (prediction - target) ** 2
        return 2.0 * c * squared / (torch.sqrt(squared + c * c) + c)


def build_loss(options) -> ElementLoss:
    """Registry target of the `loss` group (`options`: config/schema.py MSELossConfig / L1LossConfig /
    HuberLossConfig)."""
    return ElementLoss(options.name, getattr(options, "delta", 0.1), getattr(options, "schedule", "constant"))
