"""The training loop and its checkpoints: one seeded, resumable run of parts built by engine/setup.py.

Randomness is replayable by construction: the batch of step s comes from a permutation of
(seed, epoch) (data/order.py), every draw of a sample (crop, flip, caption dropout) from a generator of
(seed, epoch, sample), and every draw of step s (noise, timesteps) from generators seeded with
(seed, rank, step). A checkpoint therefore only needs the weights, the optimizer,
the LR schedule, the EMA and the step; a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from difftrain.components.seeding import seed_for
from difftrain.engine import checkpoint as ckpt
from difftrain.engine.disk import guarded_save
from difftrain.engine.loss_terms import LossTerms
from difftrain.engine.objective import loss_extras
from difftrain.engine.preemption import Preempted, StopRequests
from difftrain.engine.run_files import MetricsLog, Progress
from difftrain.errors import TrainingDiverged, UserError


class Trainer:
    def __init__(self, parts, options: dict, seed: int, run_dir: Path, resume_from: Path | None = None) -> None:
        """`options` is the `trainer` config section; `parts` an engine.setup.RunParts."""
        self.parts, self.options, self.seed, self.run_dir = parts, options, seed, run_dir
        self.accelerator, self.family, self.objective = parts.accelerator, parts.family, parts.objective
        self.model, self.optimizer, self.lr_scheduler = parts.model, parts.optimizer, parts.lr_scheduler
        self.strategy, self.ema = parts.strategy, parts.ema
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.step, self.interval = 0, {"loss": 0.0, "count": 0, "time": time.perf_counter()}
        # per-step Python work kept off the hot path (~1,000 modules and parameters in an SD UNet): train() once
        # and again after anything that may call eval(), the norm over the trainable parameters only (frozen
        # ones have no gradient, which clip_grad_norm_ skips anyway: the same norm, bitwise)
        self.needs_train_mode = True
        self.clipped = [p for p in self.model.parameters() if p.requires_grad]
        stream = getattr(parts, "stream", None)  # DreamBooth's loss parts, samples per source (docs/recipes.md)
        self.terms = (LossTerms(parts.data, stream.order, self.world, options["grad_accum"])
                      if stream is not None and getattr(parts, "data", None) is not None else None)
        if hasattr(self.ema, "bind_run"):  # ema=posthoc writes its snapshots into the run folder
            self.ema.bind_run(run_dir, self.is_main, options["max_steps"])
        if resume_from is not None:
            self.load(resume_from)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.strategy.unwrapped  # DDP: without accelerate's unwrap_model, which imports DeepSpeed

    # ---- one optimizer step --------------------------------------------------------------------
    def micro_batch(self, micro: int):
        """(x0, cond, draws) of one micro-batch, every draw from a generator of (seed, rank, step, micro)."""
        batch = self.parts.stream.batch(self.step, micro)
        generator = torch.Generator().manual_seed(seed_for(self.seed, self.rank, f"batch/{self.step}/{micro}"))
        x0, cond = self.family.inputs(batch, self.device, generator=generator)
        return x0, cond, self.objective.draw(x0, generator), loss_extras(batch)

    def compute_loss(self, x0, cond, draw, extras=None) -> torch.Tensor:
        loss, terms = self.objective.loss_terms(self.family, self.model, x0, cond, draw, extras)
        if self.terms is not None:
            self.terms.add(terms, loss.detach())
        return loss

    def train_step(self) -> tuple[float, float | None]:
        if self.needs_train_mode:
            self.model.train()
            self.needs_train_mode = False
        torch.manual_seed(seed_for(self.seed, self.rank, f"global/{self.step}"))  # dropout & co.
        total = torch.zeros((), device=self.device)
        for micro in range(self.options["grad_accum"]):
            batch = self.micro_batch(micro)
            with self.accelerator.accumulate(self.model):
                loss = self.compute_loss(*batch)
                self.accelerator.backward(loss)
                total += loss.detach()
        grad_norm = None
        if self.options["max_grad_norm"] is not None:  # DeepSpeed clips inside its step and returns the norm
            norm = self.accelerator.clip_grad_norm_(self.clipped, self.options["max_grad_norm"])
            grad_norm = None if norm is None else float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()  # once per optimizer step, whatever the world size
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unwrapped)
        if self.terms is not None:
            self.terms.end_step(self.accelerator)
        loss_value = float(self.accelerator.reduce(total, reduction="mean")) / self.options["grad_accum"]
        return loss_value, grad_norm

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, trackers=None) -> dict:
        """`trackers`: engine.trackers.Trackers that get every metric and grid (None: metrics.jsonl only)."""
        t = self.options
        metrics = MetricsLog(self.run_dir, self.is_main, resume_step=self.step if self.step else None,
                             trackers=trackers)
        progress = Progress(t["max_steps"], self.step, self.is_main, plain=not t["progress"], every=t["log_every"])
        stops = StopRequests(t["checkpoint_on_signals"], t["checkpoint_every_minutes"], self.is_main)
        stops.install()
        try:
            while self.step < t["max_steps"]:
                loss, grad_norm = self.train_step()
                self.step += 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(self._diverged_message(loss))
                self.interval["loss"] += loss
                self.interval["count"] += 1
                last = self.step == t["max_steps"]
                if self.step % t["log_every"] == 0 or last:
                    self.log_interval(metrics, grad_norm)
                progress.update(self.step, loss, self.lr)
                if t["validate_every"] and (self.step % t["validate_every"] == 0 or last):  # 0 = never
                    self.validate(metrics)
                stop, timed = stops.due(self.accelerator)  # a signal or the timer: the same on every rank
                every = t["checkpoint_every"]  # 0 = only on a stop request (signal, timer); final/ is always written
                if (every and (self.step % every == 0 or last)) or stop or timed:
                    self.save()
                    stops.saved()
                if stop and not last:
                    raise Preempted(f"{stops.received} received: stopped after step {self.step} and wrote "
                                    f"checkpoint-{self.step}; continue with output_dir={self.run_dir} resume=latest")
        finally:
            stops.restore()
            self.parts.stream.close()
            self.family.flush_caches()
            progress.stop()
            metrics.close()
        return {"step": self.step}

    def validate(self, metrics: MetricsLog) -> None:
        model = self.strategy.eval_copy()  # every rank: under ZeRO-3 this gathers the weights to rank 0
        self.needs_train_mode = True  # the copy may be the live module, put in eval mode
        if self.is_main:
            self.parts.evaluator.validate(model, self.ema, self.step, metrics)

    def _diverged_message(self, loss: float) -> str:
        kept = ckpt.complete_checkpoints(self.run_dir / "checkpoints")
        where = (f"the last good checkpoint, {kept[-1][1]}, is kept (resume=latest continues from it)" if kept
                 else "no checkpoint had been written yet")
        return (f"the loss became {loss} at step {self.step}; the run stopped and {where}. Lower optimizer.lr, "
                "set trainer.max_grad_norm, or use trainer.mixed_precision=no")

    @property
    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def log_interval(self, metrics: MetricsLog, grad_norm: float | None) -> None:
        now = time.perf_counter()
        count = self.interval["count"]
        global_batch = self.options["batch_size"] * self.options["grad_accum"] * self.world
        metrics.log(self.step, {
            "loss": self.interval["loss"] / count, "lr": self.lr,
            "ema_decay": self.ema.decay if self.ema is not None else None,
            "grad_norm": grad_norm, "samples_per_s": count * global_batch / max(now - self.interval["time"], 1e-9),
            "global_batch": global_batch,
            **(self.terms.metrics(self.step, count) if self.terms is not None else {}),
        })
        self.interval = {"loss": 0.0, "count": 0, "time": now}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        """A transaction (engine/checkpoint.py); collective: every rank takes part, rank 0 publishes."""
        root = self.run_dir / "checkpoints"
        self.needs_train_mode = True  # EMA swaps and exports may touch the live module
        self.family.flush_caches()  # latents/embeddings a lazy cache fill computed: kept if the run stops here
        self.accelerator.wait_for_everyone()
        return guarded_save(root, self.step, self.accelerator, self._write_checkpoint)

    def _write_checkpoint(self, root: Path, tmp: Path) -> Path | None:
        final = None
        self.strategy.save(tmp)  # weights + optimizer state
        if self.is_main:
            ckpt.write_torch(tmp, "lr_scheduler.pt", self.lr_scheduler.state_dict())
            if self.ema is not None:
                tensors, meta = self.ema.checkpoint_state()
                ckpt.write_tensors(tmp, "ema.safetensors", tensors)
                ckpt.write_json(tmp / "ema.json", meta)
            ckpt.write_json(tmp / "trainer_state.json", {
                "step": self.step, "world_size": self.world, "seed": self.seed, "engine": self.strategy.name,
                "batch_size": self.options["batch_size"], "grad_accum": self.options["grad_accum"],
                "interval_loss": self.interval["loss"].hex(), "interval_count": self.interval["count"],
                **(self.terms.state() if self.terms is not None else {}),
            })
            final = ckpt.publish(root, tmp, self.step)
            ckpt.prune(root, self.options["checkpoints_total_limit"], protect=final)
        return final

    def load(self, path: Path) -> None:
        state = ckpt.read_json(path, "trainer_state.json")
        written_with = state.get("engine", "ddp")
        if written_with != self.strategy.name:
            raise UserError(f"checkpoint '{path}' was written with distributed={written_with} but this run uses "
                            f"{self.strategy.name}; resume with the distributed option it was written with")
        for key, now in (("world_size", self.world), ("batch_size", self.options["batch_size"]),
                         ("grad_accum", self.options["grad_accum"]), ("seed", self.seed)):
            if state.get(key) != now:
                raise UserError(f"checkpoint '{path}' was written with {key}={state.get(key)} but this run has "
                                f"{key}={now}; resume with the same {key} (exact resume replays the same "
                                "batches), or start a new run")
        try:
            self.strategy.load(path)  # weights + optimizer state
            self.lr_scheduler.load_state_dict(ckpt.read_torch(path, "lr_scheduler.pt"))
            if self.ema is not None:
                self.ema.load_checkpoint_state(ckpt.read_tensors(path, "ema.safetensors"),
                                               ckpt.read_json(path, "ema.json"))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint '{path}' does not match this model/optimizer ({str(exc)[:300]}); "
                            "resume with the config the run was started with") from None
        self.step = int(state["step"])
        if self.terms is not None:
            self.terms.load_state(state)
        self.interval = {"loss": float.fromhex(state["interval_loss"]), "count": state["interval_count"],
                         "time": time.perf_counter()}
