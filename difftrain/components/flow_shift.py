"""Resolution-dependent ("dynamic") shift of a rectified-flow schedule, for training as inference samples.

A FlowMatchEulerDiscreteScheduler with `use_dynamic_shifting=true` (FLUX.1's) keeps unshifted tables and shifts
the sigmas of each generation by the image's token count L: mu = calculate_shift(L) = m L + b, with m and b from
the config's base/max_image_seq_len and base/max_shift, then sigma' = e^mu / (e^mu + 1/sigma - 1) ("exponential";
"linear": mu / (mu + 1/sigma - 1)). Both are the static shift s sigma / (1 + (s - 1) sigma) with s = e^mu (or mu).
diffusers' FLUX.1 training scripts draw from the unshifted tables, so they train at other noise levels than
inference uses; `ResolutionShiftedFlowSchedule` trains each latent size with the shift inference gives it.

The seam: the engine's objective sees one schedule with index tables, and the index of a draw (u * N) does not
depend on the size. The tables do: they are chosen by the latent size of the batch being noised. `add_noise` is
the first schedule call on every batch (training step and validation loss alike, engine/objective.py), and it
selects the tables of x0's (h, w); target, model_timesteps, sigma (loss weighting), DREAM and preconditioning of
that batch then read them. Tables are built once per size (a bucket), as a static-shift FlowMatchSchedule.
"""

from __future__ import annotations

import math

import torch

from difftrain.components.noise_schedules import FlowMatchSchedule


def resolution_shift(config, tokens: int) -> float:
    """The static shift s equal to the scheduler's dynamic shift at `tokens` image tokens (calculate_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = tokens * slope + (base_shift - slope * base_len)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


class ResolutionShiftedFlowSchedule(FlowMatchSchedule):
    """Rectified flow whose sigma tables follow the latent size: `tokens_of((h, w))` image tokens -> the shift
    of `resolution_shift`. Its own tables (the base class's) are the scheduler's unshifted ones and are never read
    for a batch: reading before `add_noise` selected a size raises."""

    def __init__(self, scheduler, tokens_of) -> None:
        super().__init__(scheduler)
        self.tokens_of = tokens_of
        self._by_size: dict[tuple[int, int], FlowMatchSchedule] = {}
        self._current: FlowMatchSchedule | None = None

    def for_size(self, size: tuple[int, int]) -> FlowMatchSchedule:
        """The static-shift schedule of latents of `size` (h, w), built on first use."""
        size = (int(size[0]), int(size[1]))
        schedule = self._by_size.get(size)
        if schedule is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            shift = resolution_shift(self.scheduler.config, self.tokens_of(size))
            static = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=shift,
                                                                 use_dynamic_shifting=False)
            schedule = self._by_size[size] = FlowMatchSchedule(static)
        return schedule

    def select(self, size: tuple[int, int]) -> None:
        self._current = self.for_size(size)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.select(tuple(x0.shape[-2:]))
        return super().add_noise(x0, noise, indices)

    def _tables(self, device):
        if self._current is None:
            raise RuntimeError("ResolutionShiftedFlowSchedule: no latent size selected yet (add_noise selects "
                               "the tables of the batch it noises; call select((h, w)) before reading sigmas)")
        return self._current._tables(device)
