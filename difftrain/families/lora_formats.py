"""LoRA files in the layout ComfyUI, A1111/Forge and kohya-ss' sd-scripts load (`export.lora_formats: [.., kohya]`).

The kohya file is converted from the diffusers file a run writes (final/pytorch_lora_weights.safetensors: its
tensors and its `lora_adapter_metadata`), so it is a pure function of that file. One entry per adapted module:
`<name>.lora_down.weight` (r, in), `<name>.lora_up.weight` (out, r) and `<name>.alpha` (a 0-d float32 tensor),
applied as W + alpha / r * up @ down. The alpha written is the run's `lora.alpha` (peft's `lora_alpha`), not the
rank that diffusers' `convert_state_dict_to_kohya` writes.

Names, as diffusers' loaders (`_convert_non_diffusers_lora_to_diffusers`, `_convert_kohya_flux_lora_to_diffusers`)
and ComfyUI (`model_lora_keys_unet` / `model_lora_keys_clip`) read them:

- SD 1.x/2.x and SDXL UNet: `lora_unet_<diffusers module path, dots -> underscores>`
  (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); text encoders `lora_te_` (SD 1.x),
  `lora_te1_` / `lora_te2_` (SDXL) + `text_model_encoder_layers_0_self_attn_q_proj`.
- FLUX.1: the original (BFL) module names, `lora_unet_double_blocks_<i>_img_attn_qkv`, `..._img_mlp_0`,
  `lora_unet_single_blocks_<i>_linear1`, ...; CLIP-L `lora_te1_`. BFL fuses q, k, v (and, in single blocks, the
  MLP input projection) into one linear, so their adapters become one: the down matrices stacked (rank
  r_q + r_k + r_v), the up matrices block-diagonal (a component without an adapter: zero rows), and
  alpha = (alpha / r) * fused rank, which keeps the scale alpha / r of every part.
- SD3: diffusers' SD3 loader reads no kohya layout, so there is none (config rule
  `kohya_lora_format_needs_a_kohya_layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
KOHYA_FAMILIES = ("sd15", "sdxl", "flux")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# the key endings of the diffusers file (legacy diffusers keys for SD 1.x/SDXL, peft's for FLUX/SD3)
_ENDINGS = {".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
            ".lora_linear_layer.up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up"}
_TEXT_PREFIX = {"sd15": {"text_encoder": "lora_te_"},
                "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                "flux": {"text_encoder": "lora_te1_"}}
FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock: proj_mlp has 4 x the hidden size


@dataclass(frozen=True)
class Adapter:
    """One module's LoRA: delta W = alpha / rank * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class NoKohyaName(ValueError):
    """A module the kohya layout has no name for."""


def read_adapters(tensors: dict[str, torch.Tensor], metadata: dict) -> dict[str, dict[str, Adapter]]:
    """{component: {module path: Adapter}} of a diffusers LoRA file (`metadata`: its safetensors metadata)."""
    configs = json.loads(metadata.get(METADATA_KEY, "{}"))
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        ending = next((e for e in _ENDINGS if key.endswith(e)), None)
        if ending is None:
            raise ValueError(f"'{key}' is not a LoRA weight of a diffusers LoRA file")
        component, path = key[:-len(ending)].split(".", 1)
        parts.setdefault(component, {}).setdefault(path, {})[_ENDINGS[ending]] = value
    out: dict[str, dict[str, Adapter]] = {}
    for component, modules in parts.items():
        alpha = _alpha(configs, component, next(iter(modules.values()))["down"].shape[0])
        out[component] = {path: Adapter(m["down"], m["up"], alpha) for path, m in sorted(modules.items())}
    return out


def _alpha(configs: dict, component: str, rank: int) -> float:
    """peft's lora_alpha of a component (its rank without metadata: scale 1, how diffusers reads such a file)."""
    if f"{component}.lora_alpha" not in configs:
        return float(rank)
    if configs.get(f"{component}.use_rslora") or configs.get(f"{component}.alpha_pattern") \
            or configs.get(f"{component}.rank_pattern"):
        raise ValueError(f"the {component} adapter uses rsLoRA or per-module ranks/alphas, which the kohya "
                         "layout (one alpha / rank per module) cannot express")
    return float(configs[f"{component}.lora_alpha"])


def to_kohya(family: str, adapters: dict[str, dict[str, Adapter]]) -> dict[str, torch.Tensor]:
    """The kohya state dict of a family's adapters (raises NoKohyaName for a module without a kohya name)."""
    if family not in KOHYA_FAMILIES:
        raise NoKohyaName(f"model={family} has no kohya LoRA layout that diffusers loads")
    out: dict[str, torch.Tensor] = {}
    for component, modules in adapters.items():
        if component in ("unet", "transformer"):
            entries = _flux_entries(modules) if family == "flux" else \
                {"lora_unet_" + path.replace(".", "_"): a for path, a in modules.items()}
        elif component in _TEXT_PREFIX[family]:
            entries = {_TEXT_PREFIX[family][component] + path.replace(".", "_"): a for path, a in modules.items()}
        else:
            raise NoKohyaName(f"the {component} adapter of model={family} has no kohya name")
        for name, adapter in entries.items():
            out[f"{name}.lora_down.weight"] = adapter.down.contiguous()
            out[f"{name}.lora_up.weight"] = adapter.up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return out


# ---- FLUX.1: diffusers module -> (BFL name, position in a fused linear) ----------------------------
_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
           "attn.to_add_out": ("txt_attn_proj", None), "ff.net.0.proj": ("img_mlp_0", None),
           "ff.net.2": ("img_mlp_2", None), "ff_context.net.0.proj": ("txt_mlp_0", None),
           "ff_context.net.2": ("txt_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
           "norm1_context.linear": ("txt_mod_lin", None)}
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None)}


def _flux_name(path: str) -> tuple[str, int | None]:
    for prefix, table, bfl in (("transformer_blocks.", _DOUBLE, "double_blocks"),
                               ("single_transformer_blocks.", _SINGLE, "single_blocks")):
        if path.startswith(prefix):
            index, _, rest = path[len(prefix):].partition(".")
            if rest in table:
                name, position = table[rest]
                return f"lora_unet_{bfl}_{index}_{name}", position
    raise NoKohyaName(f"the FLUX transformer module '{path}' has no kohya name (kohya names the modules of the "
                      "double and single blocks)")


def _flux_entries(modules: dict[str, Adapter]) -> dict[str, Adapter]:
    plain: dict[str, Adapter] = {}
    fused: dict[str, dict[int, Adapter]] = {}
    for path, adapter in modules.items():
        name, position = _flux_name(path)
        if position is None:
            plain[name] = adapter
        else:
            fused.setdefault(name, {})[position] = adapter
    for name, parts in fused.items():
        plain[name] = fuse(parts, _part_sizes(name, parts))
    return dict(sorted(plain.items()))


def _part_sizes(name: str, parts: dict[int, Adapter]) -> list[int]:
    """Output sizes of the fused linear's parts: q, k, v take and give the hidden size (every part's input),
    a single block's MLP projection gives FLUX_MLP_RATIO times it."""
    hidden = next(iter(parts.values())).down.shape[1]
    return [hidden] * 3 + ([FLUX_MLP_RATIO * hidden] if name.endswith("_linear1") else [])


def fuse(parts: dict[int, Adapter], sizes: list[int]) -> Adapter:
    """One adapter for a linear whose output concatenates parts of `sizes` (parts without an adapter: zero).

    down = the parts' down matrices stacked, up = their up matrices on the block diagonal, alpha = s * R with
    R the fused rank and s the parts' common scale alpha / r, so that alpha / R * up @ down has each part's
    alpha / r * up_p @ down_p in its rows. A part whose scale differs has its up matrix multiplied by the ratio."""
    order = sorted(parts)
    scale = parts[order[0]].alpha / parts[order[0]].rank
    rank = sum(parts[p].rank for p in order)
    down = torch.cat([parts[p].down for p in order], dim=0)
    up = torch.zeros(sum(sizes), rank, dtype=down.dtype)
    row_starts = [sum(sizes[:i]) for i in range(len(sizes))]
    column = 0
    for p in order:
        part = parts[p]
        if part.up.shape[0] != sizes[p]:
            raise ValueError(f"part {p} of a fused linear has {part.up.shape[0]} outputs, expected {sizes[p]}")
        ratio = (part.alpha / part.rank) / scale
        block = part.up if ratio == 1.0 else part.up * ratio
        up[row_starts[p]:row_starts[p] + sizes[p], column:column + part.rank] = block
        column += part.rank
    return Adapter(down, up, scale * rank)


# ---- files -------------------------------------------------------------------------------------
def kohya_metadata(kohya: dict[str, torch.Tensor], family: str) -> dict[str, str]:
    """What sd-scripts writes and A1111/ComfyUI show (no diffusers adapter metadata: the alphas are in the file)."""
    downs = [v for k, v in kohya.items() if k.endswith(".lora_down.weight")]
    alphas = sorted({float(v) for k, v in kohya.items() if k.endswith(".alpha")})
    base = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family]
    return {"format": "pt", "ss_network_module": "networks.lora", "ss_base_model_version": base,
            "ss_network_dim": str(min(d.shape[0] for d in downs)) if downs else "0",
            "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else "multiple"}


def write_kohya(diffusers_file: Path, family: str, out: Path | None = None) -> Path:
    """Convert a diffusers LoRA file into the kohya layout (default: lora_kohya.safetensors beside it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = f.metadata() or {}
    kohya = to_kohya(family, read_adapters(tensors, metadata))
    out = out or diffusers_file.with_name(KOHYA_FILE)
    save_file(kohya, str(out), metadata=kohya_metadata(kohya, family))
    return out


def write_lora_formats(final_dir: Path, formats: list[str], family: str) -> list[Path]:
    """The extra LoRA files of `export.lora_formats` for final/ (and final/raw/, the adapters without EMA).
    A module without a kohya name skips the kohya file with a warning (the diffusers file has everything)."""
    from difftrain.errors import warn

    if "kohya" not in formats:
        return []
    written = []
    for source in (final_dir / DIFFUSERS_FILE, final_dir / "raw" / DIFFUSERS_FILE):
        if source.is_file():
            try:
                written.append(write_kohya(source, family))
            except NoKohyaName as exc:
                warn(f"export.lora_formats: no {KOHYA_FILE} written: {exc}; {source} loads in diffusers")
                return written
    return written
