"""Load the parts of a pretrained diffusers pipeline (hub id or local folder), with one-paragraph errors.

Every component is loaded with the class that the folder's model_index.json names (restricted to the
diffusers and transformers libraries), in float32 on the CPU; the families then freeze, cast and move them.
A missing, incomplete or corrupt folder, or an unreachable hub id, raises UserError (no traceback).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from difftrain.config.schema_t2i import looks_like_path
from difftrain.errors import UserError

LAYOUT_HINT = ("a pipeline folder is what pipeline.save_pretrained(folder) writes: model_index.json plus one "
               "subfolder per component")


@dataclass(frozen=True)
class Source:
    """Where a pipeline comes from: `location` is a local folder path or a hub id."""

    pretrained: str
    location: str
    revision: str | None
    variant: str | None
    local: bool

    def describe(self) -> str:
        return f"model.pretrained='{self.pretrained}'" + (f" (revision {self.revision})" if self.revision else "")

    def hint(self) -> str:
        if self.local:
            return f"the folder must be complete and readable ({LAYOUT_HINT})"
        return ("the hub id must exist and be reachable; without network use a local folder or a cached download "
                "with HF_HUB_OFFLINE=1")


HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub's host does not answer within HUB_PROBE_TIMEOUT_S (instead
    of huggingface_hub's retries: ~40 s before the first error without network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def resolve_source(pretrained: str, revision: str | None = None, variant: str | None = None) -> Source:
    """A local folder, a hub id, or (offline or the Hub unreachable) the hub id's snapshot in the local cache."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        return Source(pretrained, str(local.absolute()), revision, variant, True)
    if local.exists() or looks_like_path(pretrained):
        raise UserError(f"model.pretrained '{pretrained}' is not a folder; give a diffusers pipeline folder "
                        f"({LAYOUT_HINT}) or a hub id such as org/name")
    if hub_reachable():
        return Source(pretrained, pretrained, revision, variant, False)
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(pretrained, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 (LocalEntryNotFoundError, invalid ids, ...)
        raise UserError(f"model.pretrained='{pretrained}' is a hub id, but the Hugging Face Hub cannot be reached "
                        "(no network, or HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache; pass a "
                        "local pipeline folder (model.pretrained=/path/to/folder), or download it once where there "
                        f"is network (huggingface-cli download {pretrained}) and point HF_HOME at that cache") from None
    return Source(pretrained, cached, revision, variant, True)


def read_model_index(source: Source, expected: tuple[str, ...], family: str) -> dict:
    """model_index.json of the pipeline, checked to be one of the `expected` pipeline classes."""
    if source.local:
        path = Path(source.location) / "model_index.json"
        if not path.is_file():
            raise UserError(f"{source.describe()} has no model_index.json, so it is not a diffusers pipeline folder "
                            f"({LAYOUT_HINT})")
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{source.describe()}: model_index.json is unreadable ({exc}); {source.hint()}") from None
    else:
        from diffusers import DiffusionPipeline

        try:
            index = dict(DiffusionPipeline.load_config(source.location, revision=source.revision))
        except Exception as exc:  # noqa: BLE001 (hub and network errors of every kind)
            raise UserError(f"could not read {source.describe()} from the Hugging Face Hub "
                            f"({_first_line(exc)}); {source.hint()}") from None
    cls = index.get("_class_name")
    if cls not in expected:
        others = {"StableDiffusion3Pipeline": "sd3", "StableDiffusionPipeline": "sd15",
                  "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}
        better = f"; use model={others[cls]}" if cls in others else ""
        raise UserError(f"{source.describe()} is a {cls} pipeline, but model={family} trains "
                        f"{' or '.join(expected)}{better}")
    return index


def null_components(index: dict) -> dict:
    """{name: None} for the components model_index.json maps to null: diffusers' from_pretrained refuses such
    a folder unless they are passed explicitly (e.g. an SD3 pipeline saved without T5)."""
    return {k: None for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is None}


def component_class(index: dict, name: str, source: Source):
    """The class model_index.json names for component `name` (None when the pipeline leaves it out)."""
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        return None
    library, cls_name = entry
    if library not in ("diffusers", "transformers"):
        raise UserError(f"{source.describe()}: component '{name}' comes from '{library}', which difftrain does not "
                        "load (only diffusers and transformers components)")
    try:
        return getattr(importlib.import_module(library), cls_name)
    except AttributeError:
        raise UserError(f"{source.describe()}: component '{name}' is a {library}.{cls_name}, which this "
                        f"{library} version does not have; upgrade {library}") from None


def load_component(index: dict, name: str, source: Source, required: bool = True):
    """Load component `name` (a model in float32, a tokenizer or a scheduler), or None when left out."""
    import torch

    cls = component_class(index, name, source)
    if cls is None:
        if required:
            raise UserError(f"{source.describe()} has no '{name}' component (model_index.json maps it to null); "
                            f"this family needs it")
        return None
    if source.local and not (Path(source.location) / name).is_dir():
        raise UserError(f"{source.describe()} lists '{name}' in model_index.json but has no {name}/ subfolder; "
                        f"{source.hint()}")
    kwargs: dict = {"subfolder": name, "revision": source.revision}
    is_model = hasattr(cls, "from_pretrained") and issubclass(cls, torch.nn.Module)
    if is_model:
        kwargs["variant"] = source.variant
        kwargs["dtype"] = torch.float32
    try:
        loaded = cls.from_pretrained(source.location, **kwargs)
    except Exception as exc:  # noqa: BLE001 (OSError, ValueError, safetensors, JSON and hub errors)
        raise UserError(f"could not load the '{name}' component ({cls.__name__}) of {source.describe()} "
                        f"({_first_line(exc)}); {source.hint()}") from None
    if is_model:
        loaded.eval()
    return loaded


def component_config(source: Source, name: str) -> dict:
    """`<name>/config.json` of a pipeline without loading weights (a local file, or one small hub download)."""
    try:
        if source.local:
            return json.loads((Path(source.location) / name / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source.location, "config.json", subfolder=name, revision=source.revision)
        return json.loads(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001 (OSError, JSON and hub errors)
        raise UserError(f"could not read the '{name}' config of {source.describe()} ({_first_line(exc)}); "
                        f"{source.hint()}") from None


def downsampling(config: dict) -> int:
    """2^(levels - 1) of a UNet or VAE config: how much smaller its deepest feature map is."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(exc).__name__}: {message[:300]}"
