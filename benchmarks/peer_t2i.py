"""Text-to-image training against diffusers' own scripts (issue 15 part 4): seconds per step and start-up.

    python benchmarks/peer_t2i.py [--steps 40] [--repeats 3] [--scripts DIR] [--out peer_t2i.json]

The same local SD1.x-shaped pipeline (UNet ~54M parameters, random weights, built here with save_pretrained), the
same image folder (metadata.jsonl captions), 128 px center crop + random flip, batch 4, fp32, AdamW lr 1e-4
constant, no validation or checkpoints, DataLoader workers 0 (both tools' default), trained by

  diffusers  examples/text_to_image/train_text_to_image.py (full) and train_text_to_image_lora.py (LoRA r4),
             fetched into --scripts (default: a scratch folder beside the output) from the tag of the installed
             diffusers, never committed; pass --scripts DIR holding the two files where there is no network;
  difftrain  `difftrain train` with its default caches (latents and prompt embeddings, filled lazily by the
             steps that first need an entry: data.cache_fill=auto), with the caches filled before step 1
             (data.cache_fill=ahead), with every cache off, and with the complete caches a previous run left in
             a shared `data.cache_dir`.

With a fresh lazily filled cache the first epoch encodes like an uncached run and later ones read more and
more of the cache (only the flips drawn are encoded), so its s/step over a short run lies between the uncached
and the reused figures; the reused row is the steady state of a long run.

Every run is a child process whose optimizer steps are stamped by a global `register_optimizer_step_post_hook`
(the same hook in both tools): start-up = launch to the end of the first optimizer step, s/step = the median
interval between steps after the first `--warmup`. Runs are interleaved (the order alternates per repeat); a run
during which other processes (or other guests of the VM: steal time) used more than 10 % of the machine (from
/proc/stat minus the run's own CPU time) is discarded and run again (up to 3 times). Medians over repeats; ratios are difftrain / diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_text_to_image.py", "train_text_to_image_lora.py")
RESOLUTION, BATCH, LR, RANK = 128, 4, 1e-4, 4


# ---- the child: stamp every optimizer step, then run the tool in this process ----------------------------
def child(stamps: Path, argv: list[str]) -> None:
    import atexit

    times: list[float] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: times.append(time.time()))
    atexit.register(lambda: stamps.write_text(json.dumps(times)))
    import runpy

    sys.argv = list(argv)
    if argv[0] == "difftrain":
        runpy.run_module("difftrain", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(argv[0], run_name="__main__")


# ---- set-up ----------------------------------------------------------------------------------------------
def build_pipeline(out: Path) -> int:
    """An SD1.x-shaped StableDiffusionPipeline (UNet at 1/4 of SD1.5's widths); returns parameter counts."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(REPO / "tests" / "t2i"))
    from tiny_pipes import write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(80, 160, 320, 320), layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=RESOLUTION)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(out.parent / "tokenizer_src")),
                                              model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6,
        vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return {name: sum(p.numel() for p in m.parameters()) for name, m in
            (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}


def write_images(folder: Path, n: int) -> None:
    """n smooth random 160x144 JPEGs, each with its own caption in metadata.jsonl."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours, things = ["red", "blue", "green", "golden", "pale"], ["dog", "cat", "house", "tree", "car", "boat"]
    rows = []
    for i in range(n):
        low = rng.integers(0, 255, (9, 10, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((160, 144), Image.BICUBIC)
        image.save(folder / f"{i:04d}.jpg", quality=92)
        caption = f"a photo of a {colours[i % 5]} {things[(i // 5) % 6]}, number {i}"
        rows.append(json.dumps({"file_name": f"{i:04d}.jpg", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def fetch_scripts(folder: Path) -> Path:
    """diffusers' two scripts at the installed version's tag (main when the tag has none), into `folder`."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        if (folder / name).is_file():
            continue
        for ref in (f"v{diffusers.__version__}", "main"):
            url = f"https://raw.githubusercontent.com/huggingface/diffusers/{ref}/examples/text_to_image/{name}"
            try:
                (folder / name).write_bytes(urllib.request.urlopen(url, timeout=20).read())
                break
            except OSError:
                continue
        else:
            sys.exit(f"could not download {name} from GitHub; put diffusers' examples/text_to_image/{name} into "
                     f"a folder and pass --scripts FOLDER")
    return folder


# ---- one run -----------------------------------------------------------------------------------------------
def commands(kind: str, tool: str, pipe: Path, data: Path, scripts: Path, out: Path, steps: int) -> list[str]:
    if tool == "diffusers":
        script = scripts / SCRIPTS[kind == "lora"]
        args = [str(script), f"--pretrained_model_name_or_path={pipe}", f"--train_data_dir={data}",
                f"--resolution={RESOLUTION}", "--center_crop", "--random_flip", f"--train_batch_size={BATCH}",
                f"--max_train_steps={steps}", f"--learning_rate={LR}", "--lr_scheduler=constant",
                "--lr_warmup_steps=0", f"--output_dir={out}", "--seed=0", "--checkpointing_steps=1000000",
                "--mixed_precision=no", "--report_to=tensorboard"]
        return args + ([f"--rank={RANK}"] if kind == "lora" else [])
    caches = {"default": [], "no caches": ["data.cache_latents=false", "data.cache_text_embeddings=false"],
              "caches ahead": ["data.cache_fill=ahead"],
              "reused caches": [f"data.cache_dir={out.parents[2] / 'shared_cache'}"]}[tool.removeprefix("difftrain ")]
    return ["difftrain", "train", "model=sd15", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={data}",
            f"data.resolution={RESOLUTION}", "data.center_crop=true", "data.random_flip=true",
            f"trainer.batch_size={BATCH}", f"trainer.max_steps={steps}", f"optimizer.lr={LR}",
            "lr_scheduler=constant", "ema=none",
            *(["lora=on", f"lora.rank={RANK}"] if kind == "lora" else ["lora=none"]), "trainer.validate_every=0", "trainer.checkpoint_every=0", "seed=0",
            f"output_dir={out}", *caches]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) of the whole machine: busy excludes idle, iowait and steal (time the hypervisor gave
    other guests, which slows every process here without showing as a process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:7]) - fields[3] - fields[4], steal


def run_once(argv: list[str], scratch: Path, warmup: int) -> dict | None:
    stamps = scratch / "stamps.json"
    stamps.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(scratch.parent / "hf_datasets_cache"), "TQDM_DISABLE": "1"}
    before_self = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0 = cpu_jiffies()
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(stamps), "--", *argv], env=env,
                          capture_output=True, text=True)
    wall = time.time() - start
    busy1, steal1 = cpu_jiffies()
    after_self = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    own = (after_self.ru_utime + after_self.ru_stime) - (before_self.ru_utime + before_self.ru_stime)
    tick = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    other = (max(0.0, (busy1 - busy0) / tick - own) + (steal1 - steal0) / tick) / (wall * cores)
    times = json.loads(stamps.read_text())
    intervals = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return {"startup_s": times[0] - start, "s_per_step": statistics.median(intervals), "wall_s": wall,
            "steps": len(times), "other_load": other}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="optimizer steps left out of the s/step median")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--kinds", default="full,lora")
    ap.add_argument("--tools", default="diffusers,difftrain default,difftrain caches ahead,difftrain no caches,"
                                       "difftrain reused caches")
    ap.add_argument("--scripts", type=Path, default=None, help="folder with diffusers' two scripts")
    ap.add_argument("--work", type=Path, default=Path("/tmp/difftrain_peer_t2i"))
    ap.add_argument("--out", type=Path, default=Path("peer_t2i.json"))
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work / "runs", ignore_errors=True)
    pipe, data = work / "pipeline", work / "images"
    if not (pipe / "model_index.json").is_file():
        counts = build_pipeline(pipe)
        print("pipeline parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    if not (data / "metadata.jsonl").is_file():
        write_images(data, args.images)
    scripts = fetch_scripts(args.scripts or work / "diffusers_scripts")
    kinds, tools = args.kinds.split(","), args.tools.split(",")
    results: dict[str, dict[str, list[dict]]] = {k: {t: [] for t in tools} for k in kinds}
    shutil.rmtree(work / "shared_cache", ignore_errors=True)
    for kind in kinds:  # "reused caches": a previous run on the same data filled data.cache_dir (not timed)
        if "difftrain reused caches" in tools:
            scratch = work / "runs" / f"{kind}-fill-shared-cache"
            scratch.mkdir(parents=True)
            fill = [*commands(kind, "difftrain reused caches", pipe, data, scripts, scratch / "out", 2),
                    "data.cache_fill=ahead"]  # every entry, not only those of 2 steps
            run_once(fill, scratch, 0)
    for repeat in range(args.repeats):
        for kind in kinds:
            order = tools if repeat % 2 == 0 else tools[::-1]
            for tool in order:
                scratch = work / "runs" / f"{kind}-{tool.replace(' ', '_')}-{repeat}"
                for _attempt in range(3):
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir(parents=True)
                    argv = commands(kind, tool, pipe, data, scripts, scratch / "out", args.steps)
                    got = run_once(argv, scratch, args.warmup)
                    if got["other_load"] <= 0.10:
                        break
                    print(f"  discarded ({got['other_load']:.0%} of the machine used by other processes or steal)")
                results[kind][tool].append(got)
                print(f"[{repeat}] {kind:4s} {tool:26s} start-up {got['startup_s']:6.2f} s  "
                      f"{got['s_per_step']:.3f} s/step  wall {got['wall_s']:6.1f} s  other {got['other_load']:.0%}",
                      flush=True)
    table = []
    for kind in kinds:
        base = results[kind].get("diffusers")
        ref = {k: statistics.median(r[k] for r in base) for k in ("startup_s", "s_per_step")} if base else None
        for tool in tools:
            med = {k: statistics.median(r[k] for r in results[kind][tool]) for k in ("startup_s", "s_per_step",
                                                                                       "wall_s")}
            row = {"kind": kind, "tool": tool, **med}
            if ref:
                row["step_ratio"] = med["s_per_step"] / ref["s_per_step"]
                row["startup_ratio"] = med["startup_s"] / ref["startup_s"]
            table.append(row)
    print(f"\n{'kind':5s} {'tool':26s} {'start-up s':>10s} {'s/step':>8s} {'step x':>7s} {'start x':>8s}")
    for r in table:
        print(f"{r['kind']:5s} {r['tool']:26s} {r['startup_s']:10.2f} {r['s_per_step']:8.3f} "
              f"{r.get('step_ratio', float('nan')):7.2f} {r.get('startup_ratio', float('nan')):8.2f}")
    args.out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "images": args.images,
                                    "table": table, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
