"""Data layer (issue 8): memory, loader throughput, cache build and start-up on a synthetic folder of JPEGs.

    python benchmarks/data.py                 # N=20,000 (and a 2,000 subset); generates the images once
    python benchmarks/data.py --small         # N=400 and 40: a quick check of the whole script
    python benchmarks/data.py --skip-before   # without (e), the pre-index loader of commit 7ccb8c2

Everything is measured in one run, on the same files, with a tiny random SD1-style pipeline built here:
(a) peak RSS of a 3-step `difftrain train` run (model=sd15, buckets=auto, fresh process and RUN_DIR) at the
    small N vs the full N: ru_maxrss of exactly that child (os.wait4). Goal: ratio <= 1.15. About 1 GB of it is
    imports (torch, diffusers, transformers), so the growth per 1,000 images is printed too.
(b) images/s of difftrain's BatchStream (TrainingData.stream; 256 px, buckets=auto, batch 4) with
    trainer.num_workers 0, 1, 2, against a bare PIL loop over the same files and buckets (open, RGB, resize to
    cover, center crop, to tensor, stack): workers=w vs w x the bare loop (w=0 vs 1x); goal >= 0.9, which
    assumes w idle cores. Steady rate, from the first batch on (prefetch gains w-1 batches: ~2% at 200 images);
    the time to the first batch (worker start-up) is printed apart. Page cache warmed; median of --repeats.
(c) images/s of the latent cache filled ahead (families/t2i_caches.LatentFill, tiny VAE, no workers) over the
    small folder, against a bare loop doing the same decode + VAE encode one image at a time (as the cache
    does) and in batches of 8.
(d) seconds from the command to its first finished step, no caches, at the full N: wall time from Popen to
    the first line of RUN_DIR/metrics.jsonl (trainer.log_every=1) in the runs of (a): interpreter, imports,
    pipeline load, index scan (a fresh RUN_DIR has no index cache; the files are in the OS page cache), the
    first batch and step. Goal: < 30 s.
(e) "before": the same run at the small N with the code of commit 7ccb8c2 (its in-memory loader decodes every
    image at start-up), extracted by `git archive` into the work folder and run with PYTHONPATH on it; without
    data.buckets (not there: one square crop). Its first-step time and peak RSS against today's.

Subprocesses run with OMP_NUM_THREADS=1, this process with torch.set_num_threads(1). The table is printed,
then one JSON line, also written to --json (default WORKDIR/data.json, outside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEFORE = "7ccb8c2"  # the last commit with the in-memory loader (difftrain/data/sources.py decoded everything)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = ["red", "blue", "green", "small", "large", "striped", "dog", "cat", "house", "tree", "car", "boat"]


# ---- inputs, built once in the work folder ---------------------------------------------------------------
def _write_image(job: tuple[Path, int, int]) -> str:
    """One JPEG, each side 256..1024 px (aspect up to 4:1, so some buckets are sparse): a colour gradient
    plus noise, seeded by its number."""
    from PIL import Image

    folder, seed, i = job
    rng = np.random.default_rng([seed, i])
    h, w = (int(v) for v in rng.integers(256, 1025, 2))
    c0, c1, c2 = rng.integers(0, 200, (3, 3))
    gy, gx = np.linspace(0, 1, h)[:, None, None], np.linspace(0, 1, w)[None, :, None]
    img = c0 + (c1 - c0) * gy + (c2 - c0) * gx + rng.integers(0, 48, (h, w, 3))
    name = f"img{i:05d}.jpg"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / name, quality=85)
    return json.dumps({"file_name": name, "text": f"a {' '.join(rng.choice(WORDS, 3))} number {i}"})


def image_folder(workdir: Path, n: int, seed: int = 0) -> Path:
    folder = workdir / f"images-{n}"
    if (folder / "metadata.jsonl").is_file():  # written last: the folder is complete
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(os.cpu_count() or 2) as pool:
        rows = pool.map(_write_image, [(folder, seed, i) for i in range(n)], chunksize=64)
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    print(f"generated {n} JPEGs in {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    return folder


def subset_folder(full: Path, n: int) -> Path:
    """The first n images of `full` as symlinks, with their metadata.jsonl rows."""
    folder = full.parent / f"{full.name}-first-{n}"
    if not (folder / "metadata.jsonl").is_file():
        folder.mkdir(exist_ok=True)
        rows = (full / "metadata.jsonl").read_text().splitlines()[:n]
        for row in rows:
            name = json.loads(row)["file_name"]
            if not (folder / name).exists():
                (folder / name).symlink_to(full / name)
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def tiny_pipeline(workdir: Path) -> Path:
    """A random StableDiffusionPipeline (UNet (8, 16), VAE 2x, 2-layer CLIP of width 16, a byte-level
    tokenizer without merges), saved with save_pretrained; nothing from the Hub."""
    out = workdir / "tiny-sd15"
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = workdir / "tiny-clip-tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())  # the 256 characters of byte-level BPE
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4, sample_size=64,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(out))
    return out


def old_tree(workdir: Path) -> Path:
    """The source tree of BEFORE; its conf/ copied into difftrain/conf (the wheel's layout), so that the
    editable install's mapping of difftrain.conf to today's conf/ is not used."""
    out = workdir / f"old-{BEFORE}"
    if not (out / "difftrain" / "conf" / "train.yaml").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        shutil.copytree(out / "conf", out / "difftrain" / "conf")
    return out


# ---- (a), (d), (e): the CLI in a fresh process ------------------------------------------------------------
def overrides(pipe: Path, data: Path, run: Path, resolution: int, buckets: bool = True) -> list[str]:
    """A short valid text-to-image run: no caches, validation only at the end (1 image, 2 steps), no eval."""
    return ["model=sd15", f"model.pretrained={pipe}", "data=imagefolder", f"data.path={data}",
            f"data.resolution={resolution}", "data.cache_text_embeddings=false",
            *(["data.buckets=auto", f"data.bucket_step={resolution // 8}"] if buckets else []),
            "ema=none", "trainer.batch_size=2", "trainer.max_steps=3", "trainer.log_every=1",
            "trainer.validate_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
            "lr_scheduler.warmup_steps=1", "validation.prompts=[a photo of a dog]", "validation.num_images=1",
            "validation.steps=2", "validation.loss_timesteps=2", "validation.loss_batch_size=2",
            "eval.enabled=false", f"output_dir={run}"]


def cli_run(args: list[str], run: Path, pythonpath: Path | None = None) -> dict:
    """{"first_step_s", "wall_s", "peak_rss_mb"} of `python -m difftrain train ARGS` in a fresh process."""
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    env, cwd = dict(ENV), run.parent
    if pythonpath is not None:  # -m puts the cwd first on sys.path: run from the old tree itself
        env["PYTHONPATH"], cwd = str(pythonpath), pythonpath
    log = run.parent / f"{run.name}.log"
    metrics, first = run / "metrics.jsonl", None
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "difftrain", "train", *args], stdout=out, stderr=out,
                                env=env, cwd=cwd)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # the rusage of this child alone
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.perf_counter() - start
        if pid:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or first is None:
        raise RuntimeError(f"difftrain train exited with {proc.returncode}; see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    return {"first_step_s": first, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


# ---- (b), (c): in this process ----------------------------------------------------------------------------
def config(pipe: Path, data: Path, resolution: int) -> dict:
    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    return validate(compose_config(overrides(pipe, data, Path("/nonexistent-run"), resolution)))


def build_data(cfg: dict, size_multiple: int, cache: Path):
    from difftrain import registry

    interpolation = registry.build("interpolation", cfg["interpolation"])
    return registry.build("data", cfg["data"], interpolation=interpolation, seed=cfg["seed"],
                          size_multiple=size_multiple, cache_folder=cache)


def bare_pixels(path: str, bucket: tuple[int, int]):
    """What a person would write: open, RGB, resize to cover the bucket (bilinear), center crop, to tensor."""
    import torch
    from PIL import Image

    bh, bw = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(bh / im.height, bw / im.width)
        rh, rw = max(bh, round(im.height * scale)), max(bw, round(im.width * scale))
        top, left = (rh - bh) // 2, (rw - bw) // 2
        im = im.resize((rw, rh), Image.BILINEAR).crop((left, top, left + bw, top + bh))
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1.0


def loader_rates(data, images: int, batch: int, repeats: int) -> dict:
    """Median images/s of the BatchStream per worker count and of the bare loop over the same batches."""
    import torch

    steps = images // batch
    order = data.order(batch, 1, 1, 0)
    plan = []  # (files, bucket) of every step: what the stream will load
    for step in range(steps):
        _, positions = order.indices(step, 0, 0)
        plan.append(([data.index.keys[p] for p in positions.tolist()],
                     data.plan.buckets[data.plan.bucket_of[int(positions[0])]]))
    [Path(f).read_bytes() for files, _ in plan for f in files]  # warm the page cache

    def bare():
        for files, bucket in plan:
            torch.stack([bare_pixels(f, bucket) for f in files])
            yield

    def stream(workers):
        s = data.stream(order, 0, steps, workers, 2, False)
        for step in range(steps):
            s.batch(step, 0)
            yield
        s.close()

    variants = {"bare": bare, **{w: (lambda w=w: stream(w)) for w in (0, 1, 2)}}
    rates, firsts = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(repeats):  # interleaved: machine noise hits every variant alike
        for name, fn in variants.items():
            batches, start = fn(), time.perf_counter()
            next(batches)  # the first batch: worker start-up (reported apart) + one batch
            first = time.perf_counter()
            for _ in batches:
                pass
            firsts[name].append(first - start)
            rates[name].append((steps - 1) * batch / (time.perf_counter() - first))
    return {**{k: statistics.median(v) for k, v in rates.items()},
            "first_batch_s": {str(k): statistics.median(v) for k, v in firsts.items()}}


def cache_rates(pipe: Path, folder: Path, resolution: int, cache: Path, batch: int = 8) -> dict:
    """images/s of the latent cache filled ahead (data.cache_fill=ahead) over `folder` against the same decode +
    VAE encode written by hand: one image at a time (what the cache does, so its bytes do not depend on the
    batch an image was in) and in batches of `batch` (what that costs)."""
    import torch

    from difftrain import registry
    from difftrain.engine.distributed import make_accelerator
    from difftrain.families.protocol import CacheOptions
    from difftrain.families.t2i_caches import LatentFill

    cfg = config(pipe, folder, resolution)
    family = registry.build("model", cfg["model"])
    data = build_data(cfg, family.size_multiple, cache / "index")
    family.prepare(data, make_accelerator(cfg), None, CacheOptions(latents=False, text=False), ["a photo"])
    t2i, n = family.t2i, len(data.index)
    device, dtype = t2i.accelerator.device, t2i.weight_dtype  # where and how the cache build encodes

    def encode(pixels):
        with torch.no_grad():
            return t2i.vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.parameters.float().cpu()

    shutil.rmtree(cache / "latents", ignore_errors=True)
    start = time.perf_counter()
    LatentFill(t2i, data, CacheOptions(latents=True, folder=cache / "latents", prune=False, fill="ahead",
                                       num_workers=0), {"benchmark": "data"})
    built = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in range(n):
        encode(bare_pixels(data.index.keys[p], data.plan.buckets[data.plan.bucket_of[p]])[None])
    alone = n / (time.perf_counter() - start)
    start = time.perf_counter()
    pending: dict[tuple[int, int], list] = {}
    for p in range(n):
        bucket = data.plan.buckets[data.plan.bucket_of[p]]
        pending.setdefault(bucket, []).append(bare_pixels(data.index.keys[p], bucket))
        if len(pending[bucket]) == batch:
            encode(torch.stack(pending.pop(bucket)))
    for group in pending.values():
        encode(torch.stack(group))
    return {"cache": built, "bare": alone, "bare_batched": n / (time.perf_counter() - start), "images": n}


# ---- the table ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="images in the full folder")
    parser.add_argument("--n-small", type=int, default=2000, help="images in the subset (a, c, e)")
    parser.add_argument("--small", action="store_true", help="quick check: --n 400 --n-small 40, 40 loader images")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/difftrain-bench-data"))
    parser.add_argument("--resolution", type=int, default=64, help="data.resolution of the CLI runs and the cache")
    parser.add_argument("--loader-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-before", action="store_true", help="leave out (e), the 7ccb8c2 loader")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/data.json")
    args = parser.parse_args()
    if args.small:
        args.n, args.n_small, args.loader_images, args.repeats = 400, 40, 40, 1
    import torch

    torch.set_num_threads(1)
    work = args.workdir
    full = image_folder(work, args.n)
    small = subset_folder(full, args.n_small)
    pipe = tiny_pipeline(work)
    res, runs = args.resolution, work / "runs"

    # (a), (d): today's CLI at both sizes, each in a fresh process and RUN_DIR
    after = {n: cli_run(overrides(pipe, folder, runs / f"n{n}", res), runs / f"n{n}")
             for n, folder in ((args.n_small, small), (args.n, full))}
    # (e): the same run with the code of BEFORE (no buckets there)
    before = None
    if not args.skip_before:
        old = old_tree(work)
        check = subprocess.run([sys.executable, "-c", "import difftrain.data.sources as s, difftrain.conf as c; "
                                "print(s.__file__, *c.__path__)"], env={**ENV, "PYTHONPATH": str(old)}, cwd=old,
                               capture_output=True, text=True, check=True).stdout
        assert all(p.startswith(str(old)) for p in check.split()), f"old code not imported: {check}"
        before = cli_run(overrides(pipe, small, runs / "before", res, buckets=False), runs / "before", old)
    # (b): the loader at 256 px, buckets as SD 1.5's ladder at 512 (step = resolution / 8)
    loader = loader_rates(build_data(config(pipe, full, 256), 8, work / "index-cache"), args.loader_images, 4,
                          args.repeats)
    # (c): the latent cache build over the small folder
    cache = cache_rates(pipe, small, res, work / "cache")

    ns, nf = args.n_small, args.n
    rss_s, rss_f = after[ns]["peak_rss_mb"], after[nf]["peak_rss_mb"]
    rows = [  # (measure, difftrain, reference, ratio, goal)
        (f"(a) peak RSS MB, N={nf} vs N={ns}", rss_f, rss_s, rss_f / rss_s, "<= 1.15"),
        *[(f"(b) loader img/s, workers={w} vs {max(w, 1)}x bare", loader[w], max(w, 1) * loader["bare"],
           loader[w] / (max(w, 1) * loader["bare"]), ">= 0.9") for w in (0, 1, 2)],
        (f"(c) latent cache img/s vs bare, one image at a time (N={cache['images']})", cache["cache"],
         cache["bare"], cache["cache"] / cache["bare"], ""),
        (f"(c') latent cache img/s vs bare in batches of 8 (N={cache['images']})", cache["cache"],
         cache["bare_batched"], cache["cache"] / cache["bare_batched"], ""),
        (f"(d) first step s, N={nf} (N={ns} ref)", after[nf]["first_step_s"], after[ns]["first_step_s"],
         after[nf]["first_step_s"] / after[ns]["first_step_s"], "< 30 s"),
    ]
    if before is not None:
        rows += [(f"(e) first step s, N={ns}, today vs {BEFORE}", after[ns]["first_step_s"], before["first_step_s"],
                  after[ns]["first_step_s"] / before["first_step_s"], ""),
                 (f"(e) peak RSS MB, N={ns}, today vs {BEFORE}", rss_s, before["peak_rss_mb"],
                  rss_s / before["peak_rss_mb"], "")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; runs: "
          f"data.resolution={res}, batch 2, 3 steps; loader: 256 px, batch 4, {args.loader_images} images, "
          f"median of {args.repeats}")
    print(f"| {'measure':<48} | {'difftrain':>10} | {'reference':>10} | {'ratio':>6} | {'goal':<8} |")
    print(f"|{'-' * 50}|{'-' * 11}:|{'-' * 11}:|{'-' * 7}:|{'-' * 10}|")
    for name, value, ref, ratio, goal in rows:
        print(f"| {name:<48} | {value:>10.2f} | {ref:>10.2f} | {ratio:>6.3f} | {goal:<8} |")
    print(f"(a) peak RSS grows {(rss_f - rss_s) / (nf - ns) * 1000:.2f} MB per 1,000 images; (b) time to the first "
          "batch, s: " + ", ".join(f"{k} {v:.3f}" for k, v in loader["first_batch_s"].items()))
    result = {"n": nf, "n_small": ns, "resolution": res, "runs": {str(k): v for k, v in after.items()},
              "before": before, "loader_images_per_s": {str(k): v for k, v in loader.items() if k != "first_batch_s"},
              "loader_first_batch_s": loader["first_batch_s"], "cache": cache,
              "rows": [dict(zip(("measure", "difftrain", "reference", "ratio", "goal"), r)) for r in rows]}
    out = args.json or work / "data.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
