"""DreamBooth's class images: generated with the base pipeline before training when the class folder has
fewer than `num_class_images` (docs/recipes.md), and reused by every later run.

Image i is `class-<i>.png`, drawn from its own generator of (seed, i), so the images are the same whatever
the batch size or the number of processes: rank r generates the missing i with i mod world = r, in batches,
each written to a temporary file and renamed (a killed generation keeps every finished image). Runs that
find enough images in the folder generate nothing. The pipeline is a plain diffusers pipeline loaded from
`model.pretrained` for the generation only and freed before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from difftrain.components.seeding import seed_for
from difftrain.config.schema_data import source_nodes
from difftrain.data.index import list_images
from difftrain.engine.run_files import make_writable_folder
from difftrain.errors import UserError

CLASS_BATCH = 4


def prior_sources(data: dict) -> list[dict]:
    """The data nodes (the data section, or each data.sources entry over it) with prior preservation."""
    return [node for _, node in source_nodes(data) if node.get("with_prior_preservation")]


def missing_class_images(entry: dict) -> list[int]:
    folder = Path(entry["class_data_dir"]).expanduser()
    have = len(list_images(folder)) if folder.is_dir() else 0
    wanted = entry["num_class_images"]
    if have >= wanted:
        return []
    names = {p.name for p, _ in list_images(folder)} if folder.is_dir() else set()
    missing = [i for i in range(wanted) if f"class-{i:05d}.png" not in names]
    return missing[:wanted - have]


def ensure_class_images(cfg: dict, family, accelerator) -> int:
    """Generates every missing class image of every source with prior preservation; the number generated."""
    todo = [(entry, missing_class_images(entry)) for entry in prior_sources(cfg["data"])]
    accelerator.wait_for_everyone()  # every rank has listed the folders before any image is written
    import torch

    device = accelerator.device
    # the global RNG is left as it was: a run that generates and one that reuses the images continue alike
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        made = sum(generate_class_images(entry, missing, family, accelerator, cfg["seed"])
                   for entry, missing in todo if missing)
    accelerator.wait_for_everyone()
    return made


def generate_class_images(entry: dict, missing: list[int], family, accelerator, seed: int) -> int:
    import torch

    from difftrain.progress import phase

    folder = Path(entry["class_data_dir"]).expanduser()
    try:
        make_writable_folder(folder)
    except OSError as exc:
        raise UserError(f"data.class_data_dir '{folder}' needs {len(missing)} more class images but is not writable "
                        f"({exc.strerror}); point it at a writable folder, or fill it with "
                        f"{entry['num_class_images']} images of '{entry['class_prompt']}'") from None
    pipe = class_pipeline(family, accelerator.device)
    mine = missing[accelerator.process_index::accelerator.num_processes]
    size = entry["resolution"]
    batches = [mine[i:i + CLASS_BATCH] for i in range(0, len(mine), CLASS_BATCH)]
    with phase("class images", len(mine), "images", accelerator.is_main_process) as tick:
        for batch in batches:
            generators = [torch.Generator("cpu").manual_seed(seed_for(seed, 0, f"class/{i}")) for i in batch]
            with torch.no_grad():
                images = pipe(prompt=[entry["class_prompt"]] * len(batch), num_inference_steps=entry["class_image_steps"],
                              height=size, width=size, generator=generators).images
            for i, image in zip(batch, images):
                path = folder / f"class-{i:05d}.png"
                tmp = folder / f".class-{i:05d}.{os.getpid()}.tmp.png"
                image.save(tmp)
                os.replace(tmp, path)
            tick(len(batch))
    del pipe
    return len(mine)


def class_pipeline(family, device):
    """The base pipeline of the run's model (a local folder or the resolved hub snapshot), on `device`."""
    from diffusers import DiffusionPipeline

    source = getattr(getattr(family, "t2i", family), "source", None)  # (the t2i families' shared part has it)
    if source is None:
        raise UserError("data.with_prior_preservation generates class images with the base pipeline: it needs a "
                        "text-to-image model (model=sd15|sdxl|sd3|flux with model.pretrained)")
    pipe = DiffusionPipeline.from_pretrained(source.location, revision=source.revision, variant=source.variant)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # class images of 'a dog' are not filtered into black squares
    return pipe.to(device)
