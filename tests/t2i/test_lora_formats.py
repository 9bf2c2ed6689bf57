"""export.lora_formats=[diffusers,kohya]: final/lora_kohya.safetensors loaded through diffusers' own
`load_lora_weights(path_to_kohya_file)` on a fresh tiny pipeline gives the denoiser and text-encoder outputs (and,
for SD 1.x, the images) of the diffusers file bitwise; its key set is exactly the expected one and every alpha is
the run's (FLUX.1's fused q/k/v: the scale alpha / r). FLUX.1's single-block linear1 (q, k, v + MLP fused) is
checked at FLUX.1's own sizes through diffusers' kohya converter, which only knows those sizes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_flux import flux_dir
from tiny_pipes import one_thread, pipeline_dir, t2i_config, write_images
from tiny_sdxl import build_sdxl, sdxl_config, write_two_shapes

from difftrain.families.lora_formats import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    Adapter,
    NoKohyaName,
    fuse,
    read_adapters,
    to_kohya,
    write_lora_formats,
)

one_thread = pytest.fixture(autouse=True)(one_thread)
KOHYA = "export.lora_formats=[diffusers,kohya]"
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    return tmp_path_factory.mktemp("format_pipes")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("format_data") / "photos")


@pytest.fixture(scope="session")
def two_shapes(tmp_path_factory):
    return write_two_shapes(tmp_path_factory.mktemp("format_shapes") / "photos")


def _file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def _diffusers_modules(run) -> dict[str, set[str]]:
    tensors, meta = _file(run / "final" / DIFFUSERS_FILE)
    return {c: set(m) for c, m in read_adapters(tensors, meta).items()}


def _keys(names) -> set[str]:
    return {n + s for n in names for s in SUFFIXES}


def _load(base, weights):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if weights is not None:
        pipe.load_lora_weights(str(weights))
    return pipe


def _text_outputs(pipe, names) -> list[torch.Tensor]:
    ids = torch.arange(2, 14).view(1, 12)
    with torch.no_grad():
        return [getattr(pipe, n)(ids, output_hidden_states=True).hidden_states[-1] for n in names]


def _check_three(outputs) -> None:
    """(base, diffusers file, kohya file): the two files agree bitwise and differ from the base."""
    base, from_diffusers, from_kohya = outputs
    for b, d, k in zip(base, from_diffusers, from_kohya, strict=True):
        assert torch.equal(d, k)
        assert not torch.equal(b, d)  # the adapters were loaded and trained


def test_sd15_unet_and_text_encoder(tmp_path, pipes, photos):
    from difftrain.engine.run import run_training

    sd15, run = pipeline_dir("sd15", pipes), tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, photos, "lora=on", "lora.rank=4", "lora.alpha=8",
                            "lora.train_text_encoder=true", "optimizer.lr=0.01", "trainer.max_steps=2", KOHYA))
    final = run / "final"
    assert (final / "raw" / KOHYA_FILE).is_file()  # the adapters without EMA too
    kohya, meta = _file(final / KOHYA_FILE)
    modules = _diffusers_modules(run)
    assert set(modules) == {"unet", "text_encoder"}
    expected = ({"lora_unet_" + p.replace(".", "_") for p in modules["unet"]}
                | {"lora_te_" + p.replace(".", "_") for p in modules["text_encoder"]})
    assert set(kohya) == _keys(expected) and len(expected) == 32 + 8
    # 4 projections x (attn1, attn2) x 4 transformer blocks (down 1, mid 1, up 2); 4 x 2 CLIP layers
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha" in kohya
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "4" and "lora_adapter_metadata" not in meta
    pipes3 = [_load(sd15, w) for w in (None, final, final / KOHYA_FILE)]
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    states = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(1))
    outputs = []
    for pipe in pipes3:
        with torch.no_grad():
            outputs.append([pipe.unet(x, t, encoder_hidden_states=states).sample,
                            *_text_outputs(pipe, ["text_encoder"]),
                            pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
                                 generator=torch.Generator().manual_seed(0)).images])
    _check_three(outputs)


def test_sdxl_unet_and_both_text_encoders(tmp_path, pipes, two_shapes):
    from difftrain.engine.run import run_training

    sdxl, run = build_sdxl(pipes / "sdxl"), tmp_path / "run"
    run_training(sdxl_config(run, sdxl, two_shapes, "lora=on", "lora.rank=2", "lora.alpha=4",
                             "lora.train_text_encoder=true", "optimizer.lr=0.01", "trainer.max_steps=2",
                             "ema=none", KOHYA))
    kohya, _ = _file(run / "final" / KOHYA_FILE)
    modules = _diffusers_modules(run)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    assert set(modules) == set(prefixes)
    expected = {prefixes[c] + p.replace(".", "_") for c, paths in modules.items() for p in paths}
    assert set(kohya) == _keys(expected)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    assert not (run / "final" / "raw").exists()  # ema=none: no raw adapters
    pipes3 = [_load(sdxl, w) for w in (None, run / "final", run / "final" / KOHYA_FILE)]
    unet = pipes3[0].unet.config
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    states = torch.randn(1, 77, unet.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, pipes3[0].text_encoder_2.config.projection_dim,
                                        generator=torch.Generator().manual_seed(2)),
             "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    outputs = []
    for pipe in pipes3:
        with torch.no_grad():
            outputs.append([pipe.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample,
                            *_text_outputs(pipe, ["text_encoder", "text_encoder_2"])])
    _check_three(outputs)


def flux_config(output_dir, pipe, data, *overrides: str) -> dict:
    """A tiny model=flux config (as tests/t2i/test_flux.py composes it)."""
    from conftest import TINY_T2I

    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    base = TINY_T2I
    return validate(compose_config([
        *base, "model=flux", f"model.pretrained={pipe}", "model.max_sequence_length=16", "data=imagefolder",
        f"data.path={data}", "data.resolution=32", "data.buckets=auto", "trainer.batch_size=2",
        "validation.prompts=[a photo of a dog]", "validation.num_images=1", "validation.steps=2",
        f"output_dir={output_dir}", *overrides]))


# double-block modules (q, k, v fused into img_attn_qkv / txt_attn_qkv) and an unfused single-block one
FLUX_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
                "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
                "single_transformer_blocks.0.proj_out"]


def test_flux_fused_qkv_and_clip(tmp_path, pipes, two_shapes):
    from difftrain.engine.run import run_training
    from difftrain.families.flux import call_flux

    dev, run = flux_dir("dev", pipes), tmp_path / "run"
    run_training(flux_config(run, dev, two_shapes, "lora=on", "lora.rank=2", "lora.alpha=4",
                             f"lora.target_modules=[{','.join(FLUX_TARGETS)}]", "lora.train_text_encoder=true",
                             "optimizer.lr=0.01", "trainer.max_steps=2", "ema=none", KOHYA))
    kohya, _ = _file(run / "final" / KOHYA_FILE)
    modules = _diffusers_modules(run)
    assert modules["transformer"] == set(FLUX_TARGETS)
    unet = {f"lora_unet_double_blocks_0_{n}" for n in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "img_mlp_2",
                                                      "txt_mlp_0")} | {"lora_unet_single_blocks_0_linear2"}
    assert set(kohya) == _keys(unet | {"lora_te1_" + p.replace(".", "_") for p in modules["text_encoder"]})
    for name in (k[:-len(".alpha")] for k in kohya if k.endswith(".alpha")):
        rank, alpha = kohya[f"{name}.lora_down.weight"].shape[0], float(kohya[f"{name}.alpha"])
        assert (rank, alpha) == ((6, 12.0) if name.endswith("qkv") else (2, 4.0))  # scale 2 = 4 / 2 everywhere
    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert qkv.shape == (3 * 32, 6) and torch.count_nonzero(qkv[:32, 2:]) == 0  # block-diagonal
    pipes3 = [_load(dev, w) for w in (None, run / "final", run / "final" / KOHYA_FILE)]
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)),
            "pooled_projections": torch.randn(1, 32, generator=torch.Generator().manual_seed(2))}
    outputs = []
    for pipe in pipes3:
        with torch.no_grad():
            outputs.append([call_flux(pipe.transformer, x, torch.tensor([500.0]), cond, 3.5),
                            *_text_outputs(pipe, ["text_encoder"])])
    _check_three(outputs)


def test_flux_single_block_linear1_at_flux1_sizes_through_diffusers_converter():
    """q, k, v of a single block fuse with the (adapter-less) MLP projection into linear1: diffusers' converter
    (hard-coded to FLUX.1's 3072/12288 split) gives back each part's delta, and a zero one for proj_mlp."""
    from diffusers import FluxPipeline

    hidden, rank, alpha, g = 3072, 2, 3.0, torch.Generator().manual_seed(0)
    tensors = {}
    for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
        tensors[f"transformer.single_transformer_blocks.0.{part}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
        tensors[f"transformer.single_transformer_blocks.0.{part}.lora_B.weight"] = torch.randn(hidden, rank, generator=g)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
    kohya = to_kohya("flux", read_adapters(tensors, meta))
    assert set(kohya) == _keys({"lora_unet_single_blocks_0_linear1"})
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * hidden + 4 * hidden, 3 * rank)
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == alpha * 3  # scale alpha / r kept
    back = FluxPipeline.lora_state_dict(dict(kohya))  # kohya -> diffusers, alpha / rank folded into the weights
    v = torch.randn(hidden, 1, generator=g, dtype=torch.float64)
    prefix = "transformer.single_transformer_blocks.0."
    for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
        a, b = (tensors[f"{prefix}{part}.lora_{m}.weight"].double() for m in "AB")
        ours = alpha / rank * b @ (a @ v)  # in float64: only the float32 weights differ
        theirs = back[f"{prefix}{part}.lora_B.weight"].double() @ (back[f"{prefix}{part}.lora_A.weight"].double() @ v)
        assert (theirs - ours).abs().max() <= 1e-6 * ours.abs().max()
    assert torch.count_nonzero(back[f"{prefix}proj_mlp.lora_B.weight"]) == 0


def test_fuse_places_each_part_and_keeps_its_scale():
    down = [torch.full((2, 3), float(i + 1)) for i in range(3)]
    up = [torch.full((4, 2), float(10 * (i + 1))) for i in range(3)]
    fused = fuse({0: Adapter(down[0], up[0], 4.0), 2: Adapter(down[2], up[2], 4.0)}, [4, 4, 4])  # no k adapter
    assert fused.alpha == 8.0 and fused.rank == 4  # scale 4 / 2 = 8 / 4
    assert torch.equal(fused.down, torch.cat([down[0], down[2]]))
    expected = torch.zeros(12, 4)
    expected[0:4, 0:2], expected[8:12, 2:4] = up[0], up[2]
    assert torch.equal(fused.up, expected)
    half = fuse({0: Adapter(down[0], up[0], 4.0), 1: Adapter(down[1], up[1], 2.0)}, [4, 4, 4])
    assert torch.equal(half.up[4:8, 2:4], up[1] * 0.5)  # a part at scale 1 under the fused scale 2


def test_a_module_without_kohya_name_skips_the_file_with_a_warning(tmp_path, capsys):
    from safetensors.torch import save_file

    tensors = {"transformer.x_embedder.lora_A.weight": torch.ones(2, 4),
               "transformer.x_embedder.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(NoKohyaName, match="x_embedder"):
        to_kohya("flux", read_adapters(tensors, {}))
    with pytest.raises(NoKohyaName, match="sd3"):
        to_kohya("sd3", read_adapters(tensors, {}))
    save_file(tensors, str(tmp_path / DIFFUSERS_FILE))
    assert write_lora_formats(tmp_path, ["diffusers", "kohya"], "flux") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIFFUSERS_FILE]
    assert "no lora_kohya.safetensors written" in capsys.readouterr().err
    assert write_lora_formats(tmp_path, ["diffusers"], "flux") == []
