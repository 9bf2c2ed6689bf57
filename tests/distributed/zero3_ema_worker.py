"""Worker for test_zero3_ema.py, started by a 2-process launcher: a tiny DeepSpeed ZeRO-3 run (parameters
partitioned: persistence threshold 0) in which every EMA step is checked against the gathered full weights,
then `copy_to` writes the EMA into the partitioned model (modifier_rank=0) and is checked on both ranks.
Each rank writes OUT/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from conftest import tiny_config  # noqa: E402

from difftrain.engine.run import run_training  # noqa: E402
from difftrain.engine.trainer import Trainer  # noqa: E402


def gathered(params) -> list[torch.Tensor]:
    """Full fp32 copies of ZeRO-3 partitions (collective: every rank calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [p.detach().clone().float() for p in params]


def tracked(trainer) -> list[torch.Tensor]:
    """The live parameters the EMA averages, in its order."""
    named = dict(trainer.unwrapped.named_parameters())
    return [named[name] for name in trainer.ema.ema.param_names]


def main(out: Path) -> None:
    report: dict = {"steps": []}
    seen: list[Trainer] = []
    real_step = Trainer.train_step

    def checked_step(self):
        if not seen:
            seen.append(self)
        ema, params = self.ema.ema, tracked(self)
        before = [s.clone() for s in ema.shadow_params]
        result = real_step(self)
        live, weight = gathered(params), 1.0 - ema.cur_decay_value
        error = max((b + weight * (p - b) - s).abs().max().item()
                    for b, p, s in zip(before, live, ema.shadow_params))
        report["steps"].append({"decay": ema.cur_decay_value, "max_error": error})
        return result

    Trainer.train_step = checked_step
    run = out / "run"
    run_training(tiny_config(run, "distributed=deepspeed_zero3", "distributed.stage3_param_persistence_threshold=0",
                             "trainer.batch_size=4", "trainer.max_steps=3", "trainer.checkpoint_every=3"))
    trainer = seen[0]
    params = tracked(trainer)
    shadows = trainer.ema.ema.shadow_params
    report["params"] = len(params)
    report["partitioned"] = sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    live = gathered(params)
    report["ema_differs_from_live"] = max((p - s).abs().max().item() for p, s in zip(live, shadows))
    trainer.ema.ema.copy_to(params)  # gathered in bounded groups, written with modifier_rank=0
    after = gathered(params)
    report["copy_to_error"] = max((p - s).abs().max().item() for p, s in zip(after, shadows))
    report["shadow_sums"] = [float(s.double().sum()) for s in shadows]
    report["names"] = list(trainer.ema.ema.param_names)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
