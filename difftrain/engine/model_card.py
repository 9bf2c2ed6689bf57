"""What final/ gets besides the family's diffusers files, and its upload to the Hugging Face Hub.

`finish_export(run_dir)` runs after the family's export (engine/evaluation.py): the extra LoRA layouts of
`export.lora_formats` (families/lora_formats.py), the last validation grid copied to final/samples.png, and
final/README.md, a Hugging Face model card built with huggingface_hub's ModelCard/ModelCardData (YAML front
matter: base_model, library_name, license carried from the base pipeline's own README when it is on disk, tags,
instance_prompt, widget; then what was trained, the key settings and a diffusers snippet that loads it); then,
with `hub.push_on_finish`, `push_final`. Everything is read from the run folder (config.yaml, final/), so
`difftrain push` (cli/push.py) writes the same card again, naming the repository it uploads to.

`push_final` checks what it can without the network first (repo id, final/, a token, the endpoint answering
within 3 s) and raises UserError naming the problem; the upload itself is huggingface_hub's create_repo +
upload_folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from difftrain.errors import UserError, warn

CARD_FILE, SAMPLES_FILE = "README.md", "samples.png"
TITLES = {"unet2d": "UNet2D", "sd15": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL",
          "sd3": "Stable Diffusion 3", "flux": "FLUX.1"}
FAMILY_TAGS = {"unet2d": [], "sd15": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"], "sd3": ["sd3"],
               "flux": ["flux"]}
LICENSE_KEYS = ("license", "license_name", "license_link")


def read_run_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no config.yaml: it is not a difftrain run folder (outputs/<timestamp>)")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def finish_export(run_dir: Path) -> None:
    """After the family's export: extra LoRA formats, samples.png, README.md; the upload when configured."""
    from difftrain.families.lora_formats import write_lora_formats

    cfg = read_run_config(run_dir)
    final, hub = run_dir / "final", cfg.get("hub") or {}
    if (cfg.get("lora") or {}).get("name", "none") != "none":
        write_lora_formats(final, list((cfg.get("export") or {}).get("lora_formats", ["diffusers"])),
                           cfg["model"]["name"])
    write_model_card(run_dir, hub.get("repo_id"), cfg)
    if hub.get("push_on_finish"):
        try:
            url = push_final(run_dir, hub["repo_id"], bool(hub.get("private")))
            print(f"difftrain: pushed {final} to {url}", flush=True)
        except UserError as exc:  # the run itself succeeded: say how to upload it later
            warn(f"hub.push_on_finish: {exc} (final/ is complete; upload it later with "
                 f"difftrain push {run_dir} --repo-id {hub['repo_id']})")


# ---- the card ------------------------------------------------------------------------------------
def _last_grid(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def base_license(pretrained: str | None, revision: str | None) -> dict:
    """license / license_name / license_link of the base pipeline's own model card, when it is on disk (a local
    folder, or the hub id's README.md in the Hugging Face cache); {} otherwise (no network is asked)."""
    if not pretrained:
        return {}
    readme = Path(pretrained).expanduser() / CARD_FILE
    if not readme.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(pretrained, CARD_FILE, revision=revision)
        except Exception:  # noqa: BLE001 (not a valid repo id: a folder without README.md)
            cached = None
        if not isinstance(cached, str):
            return {}
        readme = Path(cached)
    from huggingface_hub import ModelCard

    data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    return {k: data[k] for k in LICENSE_KEYS if data.get(k)}


def _settings(cfg: dict) -> list[tuple[str, str]]:
    trainer, opt, lr = cfg["trainer"], cfg.get("optimizer", {}), cfg.get("lr_scheduler", {})
    ema = cfg.get("ema", {})
    rows = [("steps", str(trainer["max_steps"])),
            ("batch size", f"{trainer['batch_size']} per process x {trainer['grad_accum']} accumulation"),
            ("optimizer", f"{opt.get('name')} (lr {opt.get('lr')}, weight decay {opt.get('weight_decay', 0)})"),
            ("lr schedule", f"{lr.get('name')} (warmup {lr.get('warmup_steps', 0)})"),
            ("resolution", str(cfg.get("data", {}).get("resolution"))),
            ("noise schedule", f"{cfg['scheduler']['name']} ({cfg['scheduler'].get('prediction_type', 'flow')})"),
            ("timestep density", cfg.get("weighting_scheme", {}).get("name", "uniform")),
            ("loss weighting", cfg.get("loss_weighting", {}).get("name", "none")),
            ("EMA", "none" if ema.get("name") == "none" else f"{ema.get('name')} (decay {ema.get('decay')})"),
            ("mixed precision", trainer["mixed_precision"]), ("seed", str(cfg["seed"]))]
    return rows


def _what(cfg: dict, info: dict) -> list[str]:
    family, model, lora = cfg["model"]["name"], cfg["model"], cfg.get("lora") or {"name": "none"}
    lines = [f"- Family: `{family}` ({TITLES.get(family, family)})"]
    if model.get("pretrained"):
        revision = f" (revision `{model['revision']}`)" if model.get("revision") else ""
        lines.append(f"- Base model: `{model['pretrained']}`{revision}")
    if lora["name"] != "none":
        alpha = lora["alpha"] if lora.get("alpha") is not None else lora["rank"]
        targets = lora.get("target_modules") or "the family's default modules"
        lines.append(f"- LoRA: rank {lora['rank']}, alpha {alpha} (scale {alpha / lora['rank']:g}) on {targets}"
                     + ("; the text encoder(s) too" if lora.get("train_text_encoder") else ""))
    else:
        lines.append("- Full fine-tune" if model.get("pretrained") else "- Trained from scratch")
    if (cfg.get("data") or {}).get("instance_prompt"):
        lines.append(f"- Trigger words (instance prompt): `{cfg['data']['instance_prompt']}`")
    return lines


def _prompt(cfg: dict) -> str:
    prompts = (cfg.get("validation") or {}).get("prompts") or []
    return prompts[0] if prompts else ((cfg.get("data") or {}).get("instance_prompt") or "a photo")


def _scheduler_class(final: Path) -> str | None:
    path = final / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()).get("_class_name") if path.is_file() else None


def usage_snippet(cfg: dict, final: Path, where: str) -> str:
    """A diffusers snippet that loads what final/ holds from `where` (a repo id or the folder)."""
    family, model = cfg["model"]["name"], cfg["model"]
    scheduler = _scheduler_class(final) or "DDPMScheduler"
    if family == "unet2d":
        conditional = model.get("num_class_embeds") is not None
        labels = "class_labels=labels" if conditional else ""
        return "\n".join([
            "import torch", f"from diffusers import UNet2DModel, {scheduler}", "",
            f'unet = UNet2DModel.from_pretrained("{where}", subfolder="unet").eval()',
            f'scheduler = {scheduler}.from_pretrained("{where}", subfolder="scheduler")',
            "scheduler.set_timesteps(50)", "size = unet.config.sample_size",
            "x = torch.randn(4, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))",
            *(["labels = torch.tensor([0, 1, 2, 3])  # the class of each sample"] if conditional else []),
            "for t in scheduler.timesteps:", "    with torch.no_grad():",
            f"        output = unet(x, t{', ' + labels if labels else ''}).sample",
            "    x = scheduler.step(output, t, x).prev_sample",
            "images = (x.clamp(-1, 1) + 1) / 2  # (4, C, H, W) in [0, 1]"])
    prompt = json.dumps(_prompt(cfg))
    if (final / "model_index.json").is_file():  # a whole pipeline
        return "\n".join(["import torch", "from diffusers import DiffusionPipeline", "",
                          f'pipe = DiffusionPipeline.from_pretrained("{where}", torch_dtype=torch.bfloat16).to("cuda")',
                          f"image = pipe({prompt}).images[0]", 'image.save("image.png")'])
    vae = model.get("vae")
    lines = ["import torch", f"from diffusers import {'AutoencoderKL, ' if vae else ''}DiffusionPipeline, {scheduler}", ""]
    if vae:
        lines.append(f'vae = AutoencoderKL.from_pretrained("{vae}", torch_dtype=torch.bfloat16)')
    lines += [f'pipe = DiffusionPipeline.from_pretrained("{model["pretrained"]}", '
              f'{"vae=vae, " if vae else ""}torch_dtype=torch.bfloat16).to("cuda")',
              f'pipe.load_lora_weights("{where}", weight_name="pytorch_lora_weights.safetensors")',
              f'pipe.scheduler = {scheduler}.from_pretrained("{where}", subfolder="scheduler")  # as trained',
              f"image = pipe({prompt}).images[0]", 'image.save("image.png")']
    return "\n".join(lines)


def _files(final: Path) -> list[str]:
    known = {"pytorch_lora_weights.safetensors": "the LoRA in diffusers' format (`load_lora_weights`)",
             "lora_kohya.safetensors": "the same LoRA in the kohya layout ComfyUI and A1111/Forge load",
             "raw": "the adapters without EMA", "scheduler": "the inference scheduler of the run",
             "model_index.json": "a whole diffusers pipeline (`DiffusionPipeline.from_pretrained`)",
             "unet": "the UNet (EMA weights when EMA was on)", "unet_raw": "the UNet without EMA",
             "transformer_raw": "the transformer without EMA", SAMPLES_FILE: "the last validation grid",
             "difftrain.json": "what difftrain needs to read the run back"}
    return [f"- `{name}`: {text}" for name, text in known.items() if (final / name).exists()]


def write_model_card(run_dir: Path, repo_id: str | None = None, cfg: dict | None = None) -> Path:
    """final/README.md (and final/samples.png, the last validation grid) of a finished run."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = cfg if cfg is not None else read_run_config(run_dir)
    final = run_dir / "final"
    info_path = final / "difftrain.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    family, model = cfg["model"]["name"], cfg["model"]
    lora = (cfg.get("lora") or {}).get("name", "none") != "none"
    grid = _last_grid(run_dir)
    if grid is not None:
        shutil.copyfile(grid, final / SAMPLES_FILE)
    t2i = family != "unet2d"
    tags = ["diffusers", "diffusers-training", "difftrain", family, *FAMILY_TAGS.get(family, []),
            *(["lora", "template:sd-lora"] if lora else []),
            "text-to-image" if t2i else "unconditional-image-generation"]
    extra = {}
    if (cfg.get("data") or {}).get("instance_prompt"):
        extra["instance_prompt"] = cfg["data"]["instance_prompt"]
    if t2i and grid is not None:
        extra["widget"] = [{"text": _prompt(cfg), "output": {"url": SAMPLES_FILE}}]
    data = ModelCardData(base_model=model.get("pretrained") or None, library_name="diffusers",
                         pipeline_tag="text-to-image" if t2i else "unconditional-image-generation",
                         tags=tags, **base_license(model.get("pretrained"), model.get("revision")), **extra)
    kind = "LoRA" if lora else ("fine-tune" if model.get("pretrained") else "model")
    where = repo_id or str(final)
    body = [f"# {TITLES.get(family, family)} {kind}" + (f" of {model['pretrained']}" if model.get("pretrained") else ""),
            "", f"Trained with difftrain (`model={family}`{' lora=on' if lora else ''}).", "",
            "## What was trained", "", *_what(cfg, info), "", "## Training settings", "",
            "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in _settings(cfg)), "",
            "## How to use", "", "```python", usage_snippet(cfg, final, where), "```", ""]
    if (final / "lora_kohya.safetensors").is_file():
        body += ["ComfyUI, A1111/Forge: copy `lora_kohya.safetensors` into the LoRA folder "
                 "(`models/loras`, `models/Lora`).", ""]
    body += ["## Files", "", *_files(final), ""]
    if grid is not None:
        body += ["## Samples", "", f"![validation samples]({SAMPLES_FILE})", "",
                 f"The last validation grid ({grid.stem.replace('_', ' ')}).", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = final / CARD_FILE
    card.save(str(path))
    return path


# ---- the Hub -----------------------------------------------------------------------------------
def check_repo_id(repo_id: str | None) -> str:
    """The repo id, or UserError (no network is asked)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise UserError("no repository given: pass --repo-id org/name (or set hub.repo_id=org/name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"'{repo_id}' is not a Hugging Face repo id ({str(exc).splitlines()[0]}); use org/name "
                        "with letters, digits, '-', '_' and '.'") from None
    return repo_id


def push_final(run_dir: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload final/ to the model repository `repo_id` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from difftrain.families.loading import hub_reachable

    check_repo_id(repo_id)
    final = run_dir / "final"
    if not final.is_dir() or not any(final.iterdir()):
        raise UserError(f"'{run_dir}' has no final/ folder: the run has not finished (final/ is written at its "
                        "end); finish it with resume=latest, then push")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token")
    if not hub_reachable():
        raise UserError(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached (no network, or "
                        "HF_HUB_OFFLINE=1); nothing was uploaded and final/ is unchanged, push again when online")
    cfg = read_run_config(run_dir)
    write_model_card(run_dir, repo_id, cfg)  # the card's snippet names the repository
    api = HfApi(token=token)
    kind = "LoRA" if (cfg.get("lora") or {}).get("name", "none") != "none" else "model"
    message = f"difftrain: {cfg['model']['name']} {kind} from run {run_dir.name}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(final), commit_message=message,
                                   repo_type="model")
    except HfHubHTTPError as exc:
        raise UserError(f"the Hub refused the upload to {repo_id}: {str(exc).splitlines()[0]} (check that the "
                        "token may write to this namespace); final/ is unchanged") from None
    except Exception as exc:  # noqa: BLE001 (a transport error or timeout: the network went away mid-upload)
        raise UserError(f"the upload to {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]});"
                        " final/ is unchanged, push again") from None
    return str(getattr(commit, "commit_url", commit))
