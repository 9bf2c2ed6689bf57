"""`difftrain sample RUN_DIR --prompt ...` for text-to-image runs: generate from the run's final/ outputs.

Full fine-tunes load RUN_DIR/final as a whole pipeline; LoRA runs load the base pipeline (model.pretrained of
the run) and `load_lora_weights(RUN_DIR/final)`, with the run's inference scheduler (final/scheduler).
"""

from __future__ import annotations

from pathlib import Path

from difftrain.errors import UserError


def t2i_family(run_dir: str) -> str | None:
    """The text-to-image family of a run folder (None for other runs)."""
    from omegaconf import OmegaConf

    from difftrain.config.schema_t2i import T2I_MODELS

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    name = OmegaConf.load(path).get("model", {}).get("name")
    return name if name in T2I_MODELS else None


def load_pipeline(run_dir: Path, cfg: dict, device: str, dtype):
    from diffusers import DiffusionPipeline

    from difftrain.families.loading import null_components, resolve_source

    final = run_dir / "final"
    lora_file = final / "pytorch_lora_weights.safetensors"
    try:
        if (final / "model_index.json").is_file():
            nulls = null_components(DiffusionPipeline.load_config(str(final)))
            pipe = DiffusionPipeline.from_pretrained(str(final), dtype=dtype, **nulls)
        elif lora_file.is_file():
            m = cfg["model"]
            source = resolve_source(m["pretrained"], m["revision"], m["variant"])
            nulls = null_components(DiffusionPipeline.load_config(source.location, revision=source.revision))
            pipe = DiffusionPipeline.from_pretrained(source.location, revision=source.revision,
                                                     variant=source.variant, dtype=dtype, **nulls)
            pipe.load_lora_weights(str(final))
            if (final / "scheduler").is_dir():
                pipe.scheduler = type(pipe.scheduler).from_pretrained(str(final), subfolder="scheduler")
        else:
            raise UserError(f"run '{run_dir}' has no final outputs (final/model_index.json or "
                            "final/pytorch_lora_weights.safetensors); finish it first (resume=latest continues)")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (diffusers/peft raise many types; one paragraph for all)
        raise UserError(f"could not load the outputs of run '{run_dir}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_t2i(opts) -> int:
    import torch
    from omegaconf import OmegaConf

    from difftrain.engine.sampling import save_grid

    if opts.labels:
        raise UserError("--labels is for class-conditional runs; a text-to-image run takes --prompt")
    prompts = opts.prompt or []
    if not prompts:
        raise UserError('give at least one --prompt "a photo of ..." (repeat --prompt for more rows)')
    run_dir = Path(opts.run_dir)
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    use_cuda = torch.cuda.is_available() and not cfg["trainer"]["cpu"]
    device = "cuda" if use_cuda else "cpu"
    precision = cfg["trainer"]["mixed_precision"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) if use_cuda else torch.float32
    pipe = load_pipeline(run_dir, cfg, device, dtype)
    num = opts.num or 4
    resolution = cfg["data"]["resolution"]
    extra = {} if opts.guidance is None else {"guidance_scale": opts.guidance}
    if cfg["model"]["name"] == "sd3":
        extra["max_sequence_length"] = cfg["model"]["max_sequence_length"]
    with torch.no_grad():
        images = pipe(prompt=prompts, num_images_per_prompt=num, num_inference_steps=opts.steps,
                      height=resolution, width=resolution, output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(opts.seed), **extra).images
    out = Path(opts.out) if opts.out else run_dir / "samples" / "sample_prompts.png"
    save_grid(images.float().cpu() * 2 - 1, out, nrow=num, upscale=max(1, 64 // resolution))
    print(out)
    return 0
