"""The denoisers of benchmarks/throughput.py: published configs written out (random weights, no download),
plus scaled-down versions of the same architectures, and the synthetic cached batch each one trains on.

Sources (the `config.json` of each model's denoiser folder on the Hugging Face Hub, written from the published
files; keys that equal diffusers' defaults are left out):
  sd15  stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json       UNet2DConditionModel, ~860M
  sdxl  stabilityai/stable-diffusion-xl-base-1.0 unet/config.json           UNet2DConditionModel, ~2.57B
  sd3   stabilityai/stable-diffusion-3-medium-diffusers transformer/        SD3Transformer2DModel, ~2.03B
  flux  black-forest-labs/FLUX.1-dev transformer/config.json                FluxTransformer2DModel, ~11.9B
`tests` prints the parameter counts (python benchmarks/throughput.py --count-only).
"""

from __future__ import annotations

import torch

FULL = {
    "sd15": ("UNet2DConditionModel", {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "flip_sin_to_cos": True,
        "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1}),
    "sdxl": ("UNet2DConditionModel", {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0}),
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}),
    "flux": ("FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
}

# The same block types, depths and conditioning paths, with about 1/10 of the widths: seconds per step on a CPU.
SMALL = {
    "sd15": {**FULL["sd15"][1], "block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64,
             "norm_num_groups": 16, "sample_size": 8},
    "sdxl": {**FULL["sdxl"][1], "block_out_channels": [32, 64, 128], "transformer_layers_per_block": [1, 2, 2],
             "attention_head_dim": [2, 4, 8], "cross_attention_dim": 128, "addition_time_embed_dim": 16,
             "projection_class_embeddings_input_dim": 6 * 16 + 64, "norm_num_groups": 16, "sample_size": 8},
    "sd3": {**FULL["sd3"][1], "num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 4,
            "joint_attention_dim": 128, "caption_projection_dim": 64, "pooled_projection_dim": 64,
            "pos_embed_max_size": 32, "sample_size": 32},
    "flux": {**FULL["flux"][1], "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
             "num_attention_heads": 4, "joint_attention_dim": 128, "pooled_projection_dim": 64,
             "axes_dims_rope": [4, 6, 6]},
}

# Text conditioning of the cached embeddings: (tokens, width, pooled width). SD3: 77 CLIP + 77 T5 tokens (the
# sd3 family's default max_sequence_length); FLUX.1: 512 T5 tokens.
TEXT = {
    "full": {"sd15": (77, 768, None), "sdxl": (77, 2048, 1280), "sd3": (154, 4096, 2048), "flux": (512, 4096, 768)},
    "small": {"sd15": (77, 64, None), "sdxl": (77, 128, 64), "sd3": (154, 128, 64), "flux": (128, 128, 64)},
}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}
FLOW = {"sd15": False, "sdxl": False, "sd3": True, "flux": True}
LORA_TARGETS = {"sd15": ["to_k", "to_q", "to_v", "to_out.0"], "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
                "sd3": ["to_k", "to_q", "to_v", "to_out.0"], "flux": ["to_k", "to_q", "to_v", "to_out.0"]}


def build(name: str, scale: str) -> torch.nn.Module:
    import diffusers

    cls_name, config = FULL[name]
    if scale == "small":
        config = SMALL[name]
    return getattr(diffusers, cls_name)(**config)


def synthetic_batch(name: str, scale: str, batch: int, resolution: int) -> dict[str, torch.Tensor]:
    """What a cached run's DataLoader serves: VAE latents (8x smaller sides) and prompt embeddings, on the CPU."""
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    tokens, width, pooled = TEXT[scale][name]
    out = {"latents": torch.randn(batch, LATENT_CHANNELS[name], side, side, generator=g),
           "encoder_hidden_states": torch.randn(batch, tokens, width, generator=g)}
    if pooled is not None:
        key = "text_embeds" if name == "sdxl" else "pooled_projections"
        out[key] = torch.randn(batch, pooled, generator=g)
    if name == "sdxl":  # original size, crop, target size
        out["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                       dtype=torch.float32)
    return out


def caller(name: str):
    """(denoiser, x_t, timesteps, cond) -> prediction: the difftrain family's own call function."""
    from functools import partial

    if name == "sd15":
        from difftrain.families.sd15 import call_unet

        return call_unet
    if name == "sdxl":
        from difftrain.families.sdxl import call_unet_sdxl

        return call_unet_sdxl
    if name == "sd3":
        from difftrain.families.sd3 import call_transformer

        return call_transformer
    from difftrain.families.flux import call_flux

    return partial(call_flux, guidance_scale=3.5)
