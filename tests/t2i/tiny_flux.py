"""A tiny random FluxPipeline built in code and saved with save_pretrained (shapes after diffusers' Flux pipeline
tests: 1 double + 1 single block, head 16 = rope axes 4+4+8; CLIP and T5 of width 32; a 2x VAE with 4 latent
channels, so in_channels = 4 * 4 after 2x2 packing). The tokenizers come from tiny_pipes (written here, no Hub).

"dev" is guidance-distilled (guidance_embeds) with FLUX.1-dev's dynamic-shift scheduler config, its token counts
scaled to tiny images (base 16 / max 256 tokens: a 32 px image here is 64 tokens, as a 512 px FLUX image is 1024
of 256..4096, so its shift is FLUX's at 512 px); "schnell" has no guidance embedding and a static shift of 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipes import write_clip_tokenizer, write_t5_tokenizer
from tiny_sdxl import write_two_shapes  # noqa: F401 (the same two-bucket folder as SDXL's tests; re-exported)

DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
                 "base_shift": 0.5, "max_shift": 1.15}
SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}


def build_flux(out: Path, kind: str = "dev") -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=kind == "dev")
    src = out.parent / f".{out.name}_src"
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(src / "clip_tok")), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), hidden_act="gelu", max_position_embeddings=77))
    tokenizer_2 = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(src / "t5_tok")))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                             num_layers=2, relative_attention_num_buckets=8,
                                             pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)
    config = DEV_SCHEDULER if kind == "dev" else SCHNELL_SCHEDULER
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**config), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.save_pretrained(str(out))
    return out


_BUILT: dict[str, Path] = {}


def flux_dir(kind: str, root: Path) -> Path:
    """Build each tiny Flux pipeline once per test session (kinds: dev, schnell)."""
    if kind not in _BUILT:
        _BUILT[kind] = build_flux(root / f"flux_{kind}", kind)
    return _BUILT[kind]
