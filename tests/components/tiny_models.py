"""Tiny models built in code (nothing from the Hub) shared by the component tests."""

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextConfig, CLIPTextModel

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        norm_num_groups=2,
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def lora_unet(seed=0):
    unet = tiny_unet(seed)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    return unet


def tiny_text_encoder(seed=0, adapter=True):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    if adapter:
        # transformers' `add_adapter` demands peft>=0.22, which is not on PyPI; inject_adapter_in_model
        # sets up the same "default" adapter and `peft_config`.
        lora = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
        inject_adapter_in_model(lora, model)
    return model
