"""The training loop: one seeded, resumable run of a validated config.

Randomness is replayable by construction: the batch of step s comes from a permutation of
(seed, epoch), and every draw of step s (noise, timesteps, flips, dropout) comes from generators
seeded with (seed, rank, step). A checkpoint therefore only needs the weights, the optimizer,
the LR schedule, the EMA and the step; a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from difftrain import registry
from difftrain.components.seeding import seed_for, set_seed
from difftrain.engine import checkpoint as ckpt
from difftrain.engine import distributed as dist
from difftrain.engine.data import BatchOrder
from difftrain.engine.run_files import MetricsLog, Progress
from difftrain.errors import TrainingDiverged


class Trainer:
    def __init__(self, cfg: dict, run_dir: Path, accelerator, resume_from: Path | None = None) -> None:
        from difftrain.components.interpolation import resolve_interpolation_mode

        self.cfg, self.run_dir, self.acc = cfg, run_dir, accelerator
        self.tcfg, self.seed = cfg["trainer"], cfg["seed"]
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        set_seed(self.seed, deterministic=self.tcfg["deterministic"])  # model init is identical on all ranks

        interpolation = resolve_interpolation_mode(cfg["interpolation"]["name"])
        self.data = registry.build("data", cfg["data"], interpolation=interpolation, seed=self.seed)
        self.schedule = registry.build("scheduler", cfg["scheduler"])
        self.density = registry.build("weighting_scheme", cfg["weighting_scheme"])
        self.weighting = registry.build("loss_weighting", cfg["loss_weighting"])
        self.dream = registry.build("dream", cfg["dream"])
        self.bundle = registry.build("model", cfg["model"])
        schedule = self.bundle.training_schedule(cfg["scheduler"])  # pretrained pipelines bring their own
        self.schedule = schedule if schedule is not None else self.schedule
        self.bundle.prepare(cfg, self.data, run_dir, accelerator)  # dtypes, adapters, caches
        model = self.bundle.model
        if self.tcfg["gradient_checkpointing"]:
            model.enable_gradient_checkpointing()
        optimizer = registry.build("optimizer", cfg["optimizer"], params=self.bundle.trainable_parameters())
        self.lr_scheduler = registry.build("lr_scheduler", cfg["lr_scheduler"], optimizer=optimizer,
                                           max_steps=self.tcfg["max_steps"])
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.engine, self.deepspeed = dist.engine_name(accelerator), dist.is_deepspeed(accelerator)
        dist.cast_half_inputs(accelerator, self.unwrapped)
        ema_factory = registry.build("ema", cfg["ema"])
        self.ema = ema_factory(self.unwrapped) if ema_factory is not None else None
        self.order = BatchOrder(len(self.data), self.tcfg["batch_size"], self.tcfg["grad_accum"],
                                self.world, self.seed)
        self.device = accelerator.device
        self.step, self.interval = 0, {"loss": 0.0, "count": 0, "time": time.perf_counter()}
        if resume_from is not None:
            self.load(resume_from)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    # ---- one optimizer step --------------------------------------------------------------------
    def micro_batch(self, micro: int):
        """Inputs of one micro-batch, every draw from a generator of (seed, rank, step, micro)."""
        _, indices = self.order.indices(self.step, micro, self.rank)
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.rank, f"batch/{self.step}/{micro}"))
        x0, cond = self.bundle.inputs(self.data.batch(indices, gen), self.device, generator=gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        ncfg = self.cfg["noise"]
        if ncfg["offset"]:
            noise = noise + ncfg["offset"] * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        input_noise = noise
        if ncfg["input_perturbation"]:  # perturbs x_t only; the target keeps the clean noise
            input_noise = noise + ncfg["input_perturbation"] * torch.randn(x0.shape, generator=gen)
        idx = self.schedule.index_from_u(self.density.sample(len(indices), "cpu", gen))
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return x0, cond, to(noise).to(x0.dtype), to(input_noise).to(x0.dtype), to(idx)

    def compute_loss(self, x0, cond, noise, input_noise, idx) -> torch.Tensor:
        schedule = self.schedule
        noisy = schedule.add_noise(x0, input_noise, idx)
        target = schedule.target(x0, noise, idx)
        timesteps = schedule.model_timesteps(idx)
        if self.dream is not None:
            predict = lambda x: self.bundle.predict(self.model, x, timesteps, cond)  # noqa: E731
            noisy, target = self.dream(schedule, predict, idx, noise, noisy, target)
        pred = self.bundle.predict(self.model, noisy, timesteps, cond).float()
        if schedule.precondition_outputs:  # SD3: train the x0 estimate x_t - sigma * v against x0
            pred, target = schedule.implied_sample(noisy, pred, idx), x0
        per_sample = ((pred - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
        weights = self.weighting(schedule, idx)
        return (per_sample * weights).mean() if weights is not None else per_sample.mean()

    def train_step(self) -> tuple[float, float | None]:
        self.model.train()
        torch.manual_seed(seed_for(self.seed, self.rank, f"global/{self.step}"))  # dropout & co.
        total = torch.zeros((), device=self.device)
        for micro in range(self.tcfg["grad_accum"]):
            batch = self.micro_batch(micro)
            with self.acc.accumulate(self.model):
                loss = self.compute_loss(*batch)
                self.acc.backward(loss)
                total += loss.detach()
        grad_norm = None
        if self.tcfg["max_grad_norm"] is not None:  # DeepSpeed clips inside its step and returns the norm
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.tcfg["max_grad_norm"])
            grad_norm = None if norm is None else float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unwrapped)
        loss_value = float(self.acc.reduce(total, reduction="mean")) / self.tcfg["grad_accum"]
        return loss_value, grad_norm

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, on_validate=None) -> dict:
        t = self.tcfg
        metrics = MetricsLog(self.run_dir, self.is_main, resume_step=self.step if self.step else None)
        progress = Progress(t["max_steps"], self.step, self.is_main and t["progress"])
        try:
            while self.step < t["max_steps"]:
                loss, grad_norm = self.train_step()
                self.step += 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss} at step {self.step}; the run stopped and the last good "
                        f"checkpoint in {self.run_dir / 'checkpoints'} is kept. Lower optimizer.lr, "
                        "set trainer.max_grad_norm, or use trainer.mixed_precision=no")
                self.interval["loss"] += loss
                self.interval["count"] += 1
                last = self.step == t["max_steps"]
                if self.step % t["log_every"] == 0 or last:
                    self.log_interval(metrics, grad_norm)
                progress.update(self.step, loss, self.lr)
                if (t["validate_every"] and self.step % t["validate_every"] == 0) or last:
                    if on_validate is not None:
                        on_validate(self, metrics)
                if (t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0) or last:
                    self.save()
        finally:
            progress.stop()
            metrics.close()
        return {"step": self.step}

    @property
    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def log_interval(self, metrics: MetricsLog, grad_norm: float | None) -> None:
        now = time.perf_counter()
        count = self.interval["count"]
        samples = count * self.tcfg["batch_size"] * self.tcfg["grad_accum"] * self.world
        metrics.log(self.step, {
            "loss": self.interval["loss"] / count, "lr": self.lr,
            "ema_decay": self.ema.decay if self.ema is not None else None,
            "grad_norm": grad_norm, "samples_per_s": samples / max(now - self.interval["time"], 1e-9),
            "global_batch": self.tcfg["batch_size"] * self.tcfg["grad_accum"] * self.world,
        })
        self.interval = {"loss": 0.0, "count": 0, "time": now}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        root = self.run_dir / "checkpoints"
        self.acc.wait_for_everyone()
        final = None
        tmp = ckpt.begin(root, self.step) if self.is_main else ckpt.tmp_dir_for(root, self.step)
        weights = self.bundle.checkpoint_tensors(self.unwrapped) if self.is_main and not self.deepspeed else None
        if self.deepspeed:  # collective: every rank writes its engine shards into tmp before rank 0 publishes
            self.acc.wait_for_everyone()
            weights = dist.save_deepspeed(self, tmp)
        if self.is_main:
            ckpt.write_tensors(tmp, "model.safetensors", weights)
            if not self.deepspeed:  # DeepSpeed's optimizer state is in tmp/deepspeed/
                ckpt.write_torch(tmp, "optimizer.pt", self.optimizer.state_dict())
            ckpt.write_torch(tmp, "lr_scheduler.pt", self.lr_scheduler.state_dict())
            if self.ema is not None:
                tensors, meta = self.ema.checkpoint_state()
                ckpt.write_tensors(tmp, "ema.safetensors", tensors)
                ckpt.write_json(tmp / "ema.json", meta)
            ckpt.write_json(tmp / "trainer_state.json", {
                "step": self.step, "world_size": self.world, "seed": self.seed, "engine": self.engine,
                "batch_size": self.tcfg["batch_size"], "grad_accum": self.tcfg["grad_accum"],
                "interval_loss": self.interval["loss"].hex(), "interval_count": self.interval["count"],
            })
            final = ckpt.publish(root, tmp, self.step)
            ckpt.prune(root, self.tcfg["checkpoints_total_limit"], protect=final)
        self.acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        from difftrain.errors import UserError

        state = ckpt.read_json(path, "trainer_state.json")
        if state.get("engine", "ddp") != self.engine:
            raise UserError(f"checkpoint '{path}' was written with distributed={state.get('engine', 'ddp')} but "
                            f"this run uses {self.engine}; resume with the distributed option it was written with")
        for key, now in (("world_size", self.world), ("batch_size", self.tcfg["batch_size"]),
                         ("grad_accum", self.tcfg["grad_accum"]), ("seed", self.seed)):
            if state.get(key) != now:
                raise UserError(f"checkpoint '{path}' was written with {key}={state.get(key)} but this run has "
                                f"{key}={now}; resume with the same {key} (exact resume replays the same "
                                "batches), or start a new run")
        try:
            if self.deepspeed:  # every rank loads its shards of model and optimizer
                dist.load_deepspeed(self, path)
            else:
                self.bundle.load_checkpoint_tensors(self.unwrapped, ckpt.read_tensors(path, "model.safetensors"))
                self.optimizer.load_state_dict(ckpt.read_torch(path, "optimizer.pt"))
            self.lr_scheduler.load_state_dict(ckpt.read_torch(path, "lr_scheduler.pt"))
            if self.ema is not None:
                self.ema.load_checkpoint_state(ckpt.read_tensors(path, "ema.safetensors"),
                                               ckpt.read_json(path, "ema.json"))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint '{path}' does not match this model/optimizer ({str(exc)[:300]}); "
                            "resume with the config the run was started with") from None
        self.step = int(state["step"])
        self.interval = {"loss": float.fromhex(state["interval_loss"]), "count": state["interval_count"],
                         "time": time.perf_counter()}
