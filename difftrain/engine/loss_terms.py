"""What the metrics log besides the loss for the dataset recipes (docs/recipes.md): DreamBooth's instance and
prior losses, and the samples seen per data source.

The two loss parts are summed over the micro-batches of a step, all-reduced once per step (only when a source
has prior preservation, so plain runs pay nothing), accumulated over the log interval and checkpointed with
it, so a resumed run logs the same numbers. Samples seen per source are a pure function of the data order
(data/order.py), counted from the order itself for every rank: exact after resume, no communication.
"""

from __future__ import annotations

import torch

TERMS = ("loss_instance", "loss_prior")


class LossTerms:
    def __init__(self, data, order, world_size: int, grad_accum: int) -> None:
        self.data, self.order, self.world, self.grad_accum = data, order, world_size, grad_accum
        self.active = bool(getattr(data, "has_prior", False))
        self.names = list(getattr(data, "source_names", []))
        self.step_sums = torch.zeros(3, dtype=torch.float64)     # instance sum, prior sum, prior micro-batches
        self.interval = [0.0, 0.0, 0.0]                          # the same, summed over the logged steps
        self.counted_to, self.seen = 0, [0] * len(self.names)

    def add(self, terms: dict, loss: torch.Tensor) -> None:
        """One micro-batch's terms (objective.loss_terms); a batch without class samples is all instance."""
        if not self.active:
            return
        one = torch.ones((), dtype=torch.float64, device=loss.device)  # summed where the loss is: no sync here
        if "loss_prior" in terms:
            part = torch.stack([terms["loss_instance"].double(), terms["loss_prior"].double(), one])
        else:
            part = torch.stack([loss.double(), one * 0, one * 0])
        self.step_sums = self.step_sums.to(part.device) + part

    def end_step(self, accelerator) -> None:
        if not self.active:
            return
        sums = accelerator.reduce(self.step_sums.to(accelerator.device), reduction="sum").cpu()
        self.interval = [a + float(b) for a, b in zip(self.interval, sums.tolist())]
        self.step_sums = torch.zeros(3, dtype=torch.float64)

    def metrics(self, step: int, steps_in_interval: int) -> dict:
        """The logged values of the interval ending at `step` (then a new interval starts)."""
        out: dict = {}
        if self.active and steps_in_interval:
            micro = steps_in_interval * self.grad_accum * self.world
            out["loss_instance"] = self.interval[0] / micro
            out["loss_prior"] = self.interval[1] / self.interval[2] if self.interval[2] else None
            self.interval = [0.0, 0.0, 0.0]
        if len(self.names) > 1:
            self.count_to(step)
            out.update({f"samples_seen/{n}": c for n, c in zip(self.names, self.seen)})
        return out

    def count_to(self, step: int) -> None:
        for s in range(self.counted_to, step):
            for micro in range(self.grad_accum):
                for rank in range(self.world):
                    _, slots = self.order.indices(s, micro, rank)
                    for source in self.data.sources_of_slots(slots):
                        self.seen[source] += 1
        self.counted_to = max(self.counted_to, step)

    def state(self) -> dict:
        return {"loss_terms": [float(v).hex() for v in self.interval]}

    def load_state(self, state: dict) -> None:
        saved = state.get("loss_terms")
        if saved:
            self.interval = [float.fromhex(v) for v in saved]
