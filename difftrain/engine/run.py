"""One training run from a validated config: folder, resume, loop, validation, export, evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path

from difftrain.engine import checkpoint as ckpt
from difftrain.engine.run_files import config_changes, default_run_dir, prepare_run_dir
from difftrain.errors import UserError


def make_accelerator(cfg: dict):
    """accelerate with DDP or DeepSpeed, as the `distributed` group says (engine/distributed.py)."""
    from difftrain.engine.distributed import make_accelerator as make

    return make(cfg)


def choose_run_dir(cfg: dict, accelerator, fallback: Path | None = None) -> Path:
    """Decided once, on rank 0, and shared with every rank (timestamps differ between processes)."""
    from accelerate.utils import broadcast_object_list

    if cfg["output_dir"]:
        return Path(cfg["output_dir"]).expanduser().absolute()
    choice = [str((fallback or default_run_dir()).absolute())]
    if accelerator.num_processes > 1:  # after Accelerator(): the process group exists
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0])


def _from_rank0(accelerator, value):
    """rank 0's value on every rank (a collective, so also a barrier)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _write_config(run_dir: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")


def _check_resume_config(run_dir: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    changes = config_changes(saved, cfg)
    if changes:
        raise UserError("resume would silently change the run: " + "; ".join(changes[:8]) +
                        ". Resume with the original values (see config.yaml in the run folder) or start a new run")


def validate_and_sample(trainer, metrics) -> None:
    """Sample grid with the EMA weights (always restored) and the fixed-noise validation loss."""
    from difftrain.engine.distributed import eval_model
    from difftrain.engine.sampling import save_grid, validation_loss

    model = eval_model(trainer)  # every rank: under ZeRO-3 this gathers the weights to rank 0
    if not trainer.is_main:
        return
    v, bundle, data = trainer.cfg["validation"], trainer.bundle, trainer.data
    was_training = model.training
    model.eval()

    def val_loss():
        return validation_loss(bundle, model, trainer.schedule, data, v["loss_timesteps"], v["loss_batch_size"],
                               v["seed"], trainer.device)

    values = {"val_loss": val_loss()}
    swap = trainer.ema.swapped(model) if trainer.ema is not None else _nullcontext()
    with swap:
        if trainer.ema is not None:
            values["val_loss_ema"] = val_loss()
        images, nrow = bundle.validation_images(model, trainer.schedule, data, v, trainer.device)
    path = save_grid(images, trainer.run_dir / "samples" / f"step_{trainer.step:06d}.png", nrow=nrow,
                     upscale=max(1, 64 // images.shape[-1]))
    model.train(was_training)
    metrics.log(trainer.step, values)
    metrics.image("samples", path, trainer.step)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def export_final(trainer, model=None) -> Path:
    """Write the diffusers-format outputs of the run into final/ (the model family decides the layout)."""
    final = trainer.run_dir / "final"
    trainer.bundle.export(final, model if model is not None else trainer.unwrapped, trainer.ema, trainer.schedule)
    return final


def evaluate(trainer, model=None) -> dict | None:
    """Digits-classifier accuracy on class-conditional samples (digits data only)."""
    from difftrain.engine.sampling import evaluate_digits

    e, data = trainer.cfg["eval"], trainer.cfg["data"]
    if data["name"] != "digits" or not trainer.data.num_classes:
        return None
    model = model if model is not None else trainer.unwrapped
    model.eval()
    swap = trainer.ema.swapped(model) if trainer.ema is not None else _nullcontext()
    with swap:
        return evaluate_digits(model, trainer.schedule, e["samples_per_label"], e["inference_steps"], e["seed"],
                               trainer.device, data["resolution"], data["num_classes"])


def run_training(cfg: dict, fallback_dir: Path | None = None) -> dict:
    """Train, export and evaluate; returns the summary written to summary.json."""
    from difftrain.engine.distributed import eval_model
    from difftrain.engine.trainer import Trainer

    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    run_dir = choose_run_dir(cfg, accelerator, fallback_dir)
    resume_from = None
    if cfg["resume"]:
        if not run_dir.is_dir():
            raise UserError(f"resume={cfg['resume']} but output_dir '{run_dir}' does not exist; "
                            "pass the folder of the run to continue")
        resume_from = ckpt.resolve_resume(cfg["resume"], run_dir)
        _check_resume_config(run_dir, cfg)
    problem = None
    if accelerator.is_main_process:
        try:
            prepare_run_dir(run_dir, resuming=bool(cfg["resume"]))
            ckpt.remove_stale(run_dir / "checkpoints")
        except UserError as exc:
            problem = str(exc)
    problem = _from_rank0(accelerator, problem)  # every rank stops with rank 0's error (no rank left waiting)
    if problem is not None:
        raise UserError(problem)
    trainer = Trainer(cfg, run_dir, accelerator, resume_from)
    if accelerator.is_main_process:  # only once everything is built: a load error leaves no "run" behind
        _write_config(run_dir, cfg)
    start_step = trainer.step
    trainer.fit(on_validate=validate_and_sample)
    summary = {"run_dir": str(run_dir), "steps": trainer.step, "resumed_from_step": start_step or None,
               "seconds": round(time.perf_counter() - started, 2), "world_size": accelerator.num_processes}
    model = eval_model(trainer)  # every rank: under ZeRO-3 this gathers the weights to rank 0
    if accelerator.is_main_process:
        export_final(trainer, model)
        if cfg["eval"]["enabled"]:
            result = evaluate(trainer, model)
            if result is not None:
                summary["eval"] = result
                (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        last = _last_metrics(run_dir)
        summary.update({k: last.get(k) for k in ("loss", "val_loss", "val_loss_ema") if k in last})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _last_metrics(run_dir: Path) -> dict:
    merged: dict = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                merged.update({k: v for k, v in json.loads(line).items() if v is not None})
    return merged


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
