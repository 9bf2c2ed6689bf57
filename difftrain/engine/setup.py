"""Everything a run is made of, built from the validated config in one place, top to bottom.

The order matters for exact reproducibility: the global RNG is seeded first, so the model's random
initialisation (and LoRA's) is the same on every rank and in every resumed run; nothing between the seed
and the model build draws from it. The model is built before the data because the data's buckets are
sized by the model (`family.size_multiple`); indexing the data draws nothing from the global RNG. Every
option group is built by the registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from difftrain import registry
from difftrain.components.seeding import set_seed
from difftrain.data.loader import BatchStream
from difftrain.engine.class_images import ensure_class_images, prior_sources
from difftrain.engine.compile import apply_speed_options
from difftrain.engine.evaluation import Evaluator
from difftrain.engine.objective import DiffusionObjective
from difftrain.engine.optim import build_optimizer_on
from difftrain.engine.strategies import strategy_for
from difftrain.families.protocol import CacheOptions


@dataclass
class RunParts:
    """What the Trainer runs: the prepared model and optimizer, how to save them, what to minimise."""

    accelerator: object
    family: object        # families.protocol.ModelFamily
    data: object          # data.sources.TrainingData
    objective: DiffusionObjective
    model: object         # family.module after accelerator.prepare
    optimizer: object
    lr_scheduler: object
    strategy: object      # engine.strategies.DDPStrategy | DeepSpeedStrategy
    ema: object | None    # components.ema_factory.EMA
    stream: BatchStream   # the micro-batches of this rank, decoded by DataLoader workers
    evaluator: Evaluator


def cache_folder(cfg: dict, run_dir: Path) -> Path:
    data = cfg["data"]
    return Path(data["cache_dir"]).expanduser() if data.get("cache_dir") else run_dir / "cache"


def cache_options(cfg: dict, run_dir: Path) -> CacheOptions:
    """data.cache_* as the families read them (data=digits has none: nothing is cached)."""
    from difftrain.config.schema_data import latents_cached

    data = cfg["data"]
    return CacheOptions(latents=latents_cached(data), text=data.get("cache_text_embeddings"),
                        folder=cache_folder(cfg, run_dir), prune=not data.get("cache_dir"),
                        fill=data.get("cache_fill", "auto"), num_workers=cfg["trainer"]["num_workers"],
                        key_fields=(("center_crop", data.get("center_crop")),
                                    ("interpolation", cfg["interpolation"]["name"])))


def build_run(cfg: dict, run_dir: Path, accelerator) -> RunParts:
    trainer = cfg["trainer"]
    set_seed(cfg["seed"], deterministic=trainer["deterministic"])  # model init is identical on all ranks
    interpolation = registry.build("interpolation", cfg["interpolation"])
    family = registry.build("model", cfg["model"])
    if prior_sources(cfg["data"]):  # DreamBooth: missing class images come from the base pipeline
        ensure_class_images(cfg, family, accelerator)
    data = registry.build("data", cfg["data"], interpolation=interpolation, seed=cfg["seed"],
                          size_multiple=family.size_multiple, cache_folder=cache_folder(cfg, run_dir))
    if accelerator.is_main_process:
        data.write_records(run_dir)
    schedule = family.training_schedule(registry.build("scheduler", cfg["scheduler"]))
    objective = DiffusionObjective(
        schedule, registry.build("weighting_scheme", cfg["weighting_scheme"]),
        registry.build("loss_weighting", cfg["loss_weighting"]), registry.build("dream", cfg["dream"]),
        noise_offset=cfg["noise"]["offset"], input_perturbation=cfg["noise"]["input_perturbation"],
        element_loss=None if cfg["loss"]["name"] == "mse" else registry.build("loss", cfg["loss"]))
    lora = registry.build("lora", cfg["lora"])
    caches = cache_options(cfg, run_dir)
    if caches.text is None and getattr(data, "random_captions", False):  # shuffled tags: one embedding per
        caches = dataclasses.replace(caches, text=False)                  # caption would be stale
    family.prepare(data, accelerator, lora, caches, list(cfg["validation"]["prompts"]))
    if trainer["gradient_checkpointing"]:
        family.module.enable_gradient_checkpointing()
    apply_speed_options(family.module, trainer, accelerator.device)  # tf32, channels_last, compile (in place)
    optimizer = build_optimizer_on(cfg["optimizer"], family.trainable_parameters(), accelerator.device)
    lr_scheduler = registry.build("lr_scheduler", cfg["lr_scheduler"], optimizer=optimizer,
                                  max_steps=trainer["max_steps"])
    model, optimizer = accelerator.prepare(family.module, optimizer)  # the LR schedule is stepped by us
    strategy = strategy_for(accelerator, model, optimizer, family)
    strategy.cast_half_inputs()
    ema_factory = registry.build("ema", cfg["ema"])
    ema = ema_factory(strategy.unwrapped) if ema_factory is not None else None
    order = data.order(trainer["batch_size"], trainer["grad_accum"], accelerator.num_processes, cfg["seed"])
    stream = data.stream(order, accelerator.process_index, trainer["max_steps"], trainer["num_workers"],
                         trainer["prefetch_factor"], pin_memory=accelerator.device.type == "cuda")
    digits_classes = data.num_classes if cfg["data"]["name"] == "digits" else None
    evaluator = Evaluator(family, objective, data, cfg["validation"], cfg["eval"], run_dir, accelerator.device,
                          digits_classes)
    return RunParts(accelerator, family, data, objective, model, optimizer, lr_scheduler, strategy, ema, stream,
                    evaluator)
