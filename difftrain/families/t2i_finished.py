"""A finished text-to-image run for `difftrain sample`: its final/ outputs as a diffusers pipeline.

Full fine-tunes load RUN_DIR/final as a whole pipeline; LoRA runs load the base pipeline (model.pretrained of
the run) and `load_lora_weights(RUN_DIR/final)`, with the run's inference scheduler (final/scheduler). The
pipeline is loaded on the first `generate()`, so a command's arguments are checked before that wait.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.errors import UserError
from difftrain.families.protocol import SampleRequest
from difftrain.families.t2i import DTYPES


class FinishedPipeline:
    """protocol.FinishedRun of the latent text-to-image families (conditioned on prompts)."""

    conditioning = "prompts"
    num_classes = None

    def __init__(self, run_dir: Path, cfg: dict, device: str, pipeline_options: dict | None = None) -> None:
        """`pipeline_options`: extra keyword arguments of the family's pipeline call (SD3: max_sequence_length)."""
        self.run_dir, self.cfg, self.device = run_dir, cfg, device
        self.family = cfg["model"]["name"]
        self.resolution = int(cfg["data"]["resolution"])
        self.pipeline_options = dict(pipeline_options or {})
        on_cuda = str(device).startswith("cuda")
        precision = cfg["trainer"]["mixed_precision"]
        self.dtype = DTYPES.get(precision, torch.float32) if on_cuda else torch.float32
        self._pipe = None

    def pipeline(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.run_dir, self.cfg, self.device, self.dtype)
        return self._pipe

    def generate(self, request: SampleRequest) -> tuple[torch.Tensor, int]:
        count = request.per_condition
        extra = {} if request.guidance_scale is None else {"guidance_scale": request.guidance_scale}
        height, width = request.size or (self.resolution, self.resolution)
        with torch.no_grad():
            images = self.pipeline()(prompt=list(request.prompts or ()), num_images_per_prompt=count,
                                     num_inference_steps=request.steps, height=height, width=width,
                                     output_type="pt", generator=torch.Generator("cpu").manual_seed(request.seed),
                                     **extra, **self.pipeline_options).images
        return images.float().cpu() * 2 - 1, count


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
            model = cfg["model"]
            source = resolve_source(model["pretrained"], model["revision"], model["variant"])
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
