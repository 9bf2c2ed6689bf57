"""A tiny random StableDiffusionXLPipeline, built in code and saved with save_pretrained, and the SDXL test data.

The configs follow diffusers' SDXL pipeline tests (a "text_time" UNet, CLIPTextModel + CLIPTextModelWithProjection),
shrunk: encoder 1 has 8 features, encoder 2 has 16 (so the concatenation is 24 = cross_attention_dim) and a
projection of 8, and the UNet adds 6 x 4 time features to it (projection_class_embeddings_input_dim 32).
The tokenizer is tiny_pipes' byte-level CLIP BPE, so nothing comes from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_pipes import CAPTIONS, write_clip_tokenizer

SQUARE, TALL = (40, 48), (64, 40)  # (h, w): with data.resolution=32 and buckets=auto -> 32x32 and 40x24 buckets


def build_sdxl(out: Path, prediction_type: str = "epsilon", vae_scaling: float = 0.13025) -> Path:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8, cross_attention_dim=8 + 16,
        norm_num_groups=2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading",
                                       prediction_type=prediction_type)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                        norm_num_groups=2, sample_size=32, scaling_factor=vae_scaling)
    src = write_clip_tokenizer(out.parent / f".{out.name}_src" / "clip_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(src), model_max_length=77)

    def clip(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=2 * hidden,
                              layer_norm_eps=1e-05, num_attention_heads=2, num_hidden_layers=2,
                              vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu", **extra)

    text_encoder = CLIPTextModel(clip(8))
    text_encoder_2 = CLIPTextModelWithProjection(clip(16, projection_dim=8))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(str(out))
    return out


def write_two_shapes(folder: Path, per_shape: int = 4) -> Path:
    """`per_shape` random RGB images of each of two aspect ratios (SQUARE, TALL), captioned in metadata.jsonl."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2 * per_shape):
        name = f"img{i}.png"
        size = SQUARE if i % 2 == 0 else TALL
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def sdxl_config(output_dir: Path, pipe: Path, data: Path, *overrides: str) -> dict:
    """A validated tiny model=sdxl config through the real Hydra tree (32 px, two buckets, batches of 2)."""
    from conftest import TINY_T2I

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    base = TINY_T2I
    return validate(compose_config([
        *base, "model=sdxl", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={data}",
        "data.resolution=32", "data.buckets=auto", "trainer.batch_size=2", "validation.prompts=[a photo of a dog]",
        "validation.num_images=1", "validation.steps=2", f"output_dir={output_dir}", *overrides]))
