"""Tiny random SD1-style and SD3-style pipelines, built in code and saved with save_pretrained.

Configs follow diffusers' own pipeline tests (reference note §4.1); the tokenizers are written here
(a byte-level CLIP BPE vocab.json/merges.txt and a T5 unigram tokenizer.json), so nothing comes from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of a tiny byte-level BPE (every byte, with and without </w>, a few merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("o", "g</w>"), ("a", "t</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def write_t5_tokenizer(folder: Path) -> Path:
    """tokenizer.json of a tiny unigram T5 tokenizer built with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "photo", "of", "dog", "cat", "red", "blue")]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": 0, "model_max_length": 512}))
    return folder


def _clip_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp / "clip_tok")), model_max_length=77)


def build_sd15(out: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline (UNet (4,8), VAE 2x, CLIP hidden 8), saved to `out`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, prediction_type=prediction_type)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                        norm_num_groups=2, sample_size=32)
    tokenizer = _clip_tokenizer(out.parent / f".{out.name}_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=8, intermediate_size=16, layer_norm_eps=1e-05, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


def build_sd3(out: Path, with_t5: bool = True) -> Path:
    """A tiny StableDiffusion3Pipeline (1-layer MMDiT, 2 CLIP-with-projection, tiny T5, 2x VAE), saved to `out`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    src = out.parent / f".{out.name}_src"
    tokenizer = _clip_tokenizer(src)
    clip_config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                                 layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                                 vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=32,
                                 max_position_embeddings=77)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(src / "t5_tok")))
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=37, d_kv=8,
                                                 num_heads=4, num_layers=2, relative_attention_num_buckets=8,
                                                 pad_token_id=tokenizer_3.pad_token_id,
                                                 eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(str(out))
    return out


# ---- shared test helpers ---------------------------------------------------------------------------
_BUILT: dict[str, Path] = {}
CAPTIONS = ["a photo of a dog", "a red cat", "a blue dog", "a photo of a cat"]


def pipeline_dir(kind: str, root: Path) -> Path:
    """Build each tiny pipeline once per test session (kinds: sd15, sd3, sd3_no_t5)."""
    if kind not in _BUILT:
        out = root / kind
        if kind == "sd15":
            build_sd15(out)
        elif kind == "sd3":
            build_sd3(out)
        else:
            build_sd3(out, with_t5=False)
        _BUILT[kind] = out
    return _BUILT[kind]


def write_images(folder: Path, n: int = 8, size: tuple[int, int] = (40, 48), captions: str = "metadata") -> Path:
    """n random RGB images, captioned in metadata.jsonl ("metadata"), .txt files ("txt") or not ("none")."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
        text = CAPTIONS[i % len(CAPTIONS)]
        rows.append({"file_name": name, "text": text})
        if captions == "txt":
            (folder / f"img{i}.txt").write_text(text)
    if captions == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def t2i_config(output_dir: Path, family: str, pipe: Path, data: Path | None, *overrides: str) -> dict:
    """A validated tiny text-to-image config through the real Hydra tree (TINY without the unet2d keys);
    `data` is an image folder (data=imagefolder), or None when the overrides choose the data."""
    from conftest import TINY_T2I

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    base = TINY_T2I
    family_keys = ["model=sd15"] if family == "sd15" else ["model=sd3", "scheduler=sd3"]
    return validate(compose_config([
        *base, *family_keys, f"model.pretrained={pipe}",
        *(["data=imagefolder", f"data.path={data}"] if data is not None else []), "data.resolution=32",
        "trainer.batch_size=4", "validation.prompts=[a photo of a dog,a red cat]",
        "validation.num_images=1", "validation.steps=2", f"output_dir={output_dir}", *overrides]))


def one_thread():
    """Tiny models run fastest on one thread (and OpenMP spin-waits stall on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_file(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter metadata) of RUN/final/pytorch_lora_weights.safetensors."""
    from safetensors import safe_open

    with safe_open(str(run / "final" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return tensors, meta


def cache_tensors(run: Path, kind: str) -> dict[str, torch.Tensor]:
    """Every tensor ("<entry>.<name>") of the run's one `kind` cache (latents or text), from all its part files."""
    from safetensors.torch import load_file

    (folder,) = (run / "cache").glob(f"{kind}-*")
    tensors: dict[str, torch.Tensor] = {}
    for part in sorted(folder.glob("part-*.safetensors")):
        for name, value in load_file(str(part)).items():
            tensors.setdefault(name, value)
    return tensors


def losses(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]
