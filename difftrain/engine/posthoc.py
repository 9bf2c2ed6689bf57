"""`difftrain ema-synth` / `ema-sweep`: EMA profiles of any length from a run's post-hoc EMA snapshots.

The snapshots (RUN_DIR/ema_snapshots, written by components/posthoc_ema.PostHocEMA) are listed and checked
(metadata and CRC; a corrupt one is reported and skipped), the least-squares weights of each target profile
are solved in closed form (components/posthoc_ema.synthesis_weights), the snapshots are combined with those
weights one file at a time (float64 accumulator), and the result is laid over the latest checkpoint's model
weights and written as a diffusers model folder. model=unet2d only so far.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.components import posthoc_ema as ph
from difftrain.errors import UserError, warn


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    profile: int
    gamma: float
    sigma_rel: float


def read_snapshot(path: Path, check: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, fp32 tensors); ValueError when the file is unreadable or fails its CRC."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(f"unreadable ({str(exc)[:120]})") from None
    if meta.get("format") != ph.SNAPSHOT_FORMAT:
        raise ValueError("not a difftrain post-hoc EMA snapshot (no format metadata)")
    if check and meta.get("crc32") != ph.tensor_crc(tensors):
        raise ValueError("its tensors do not match the CRC in its metadata (the file changed after it was written)")
    return meta, {k: v.float() for k, v in tensors.items()}


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every snapshot of the run that reads back and passes its CRC, oldest first; the others are warned about."""
    folder = Path(run_dir) / ph.SNAPSHOT_DIR
    if not folder.is_dir():
        raise UserError(f"run '{run_dir}' has no {ph.SNAPSHOT_DIR}/ folder: post-hoc EMA needs a run trained with "
                        "ema=posthoc (its snapshots are written every ema.snapshot_every steps); train with it")
    found = []
    for path in sorted(folder.iterdir()):
        if not ph.SNAPSHOT_RE.match(path.name):
            continue
        try:
            meta, _ = read_snapshot(path)
            found.append(Snapshot(path, int(meta["step"]), int(meta["profile"]), float(meta["gamma"]),
                                  float(meta["sigma_rel"])))
        except (ValueError, KeyError) as exc:
            warn(f"skipping EMA snapshot '{path}': {exc}")
    if not found:
        raise UserError(f"'{folder}' holds no readable snapshot; train (or resume) the run with ema=posthoc")
    return sorted(found, key=lambda s: (s.step, s.profile))


def parse_sigma_rels(text: str) -> list[float]:
    """'0.05,0.12,0.2' or 'start:stop:count' (evenly spaced, both ends included)."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            n = int(count)
            values = [float(start) + (float(stop) - float(start)) * i / max(n - 1, 1) for i in range(n)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= ph.SIGMA_REL_MAX + 1e-9 for v in values):
        raise UserError(f"--sigma-rel '{text}' must be comma-separated values or start:stop:count, each in "
                        f"(0, {ph.SIGMA_REL_MAX:.4f}], e.g. --sigma-rel 0.05,0.12,0.2 or --sigma-rel 0.02:0.3:8")
    return [min(v, ph.SIGMA_REL_MAX) for v in values]


@dataclass
class Synthesis:
    sigma_rel: float
    gamma: float
    step: int
    weights: list[tuple[str, float]]  # (snapshot file name, weight)
    fit_error: float                  # relative L2 distance of the combined profile to the target
    tensors: dict[str, torch.Tensor]


def synthesize(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None) -> Synthesis:
    """The EMA profile (sigma_rel, step) as the best combination of the snapshots taken at or before `step`
    (default: the newest snapshot's step)."""
    step = max(s.step for s in snapshots) if step is None else int(step)
    use = [s for s in snapshots if s.step <= step]
    if not use:
        raise UserError(f"--step {step} is before the first snapshot (step {snapshots[0].step}); "
                        "give a later --step or none (the newest snapshot's step)")
    gamma = ph.gamma_of_sigma_rel(sigma_rel)
    x, error = ph.synthesis_weights([(s.gamma, s.step) for s in use], (gamma, step))
    total: dict[str, torch.Tensor] = {}
    for snap, w in zip(use, x):
        _, tensors = read_snapshot(snap.path, check=False)  # checked when listed
        for name, t in tensors.items():
            acc = total.setdefault(name, torch.zeros(t.shape, dtype=torch.float64))
            acc.add_(t.double(), alpha=w)
        del tensors
    return Synthesis(sigma_rel, gamma, step, [(s.path.name, w) for s, w in zip(use, x)], error,
                     {k: v.float() for k, v in total.items()})


def load_synthesized(root: Path, cfg: dict, tensors: dict[str, torch.Tensor], device: str = "cpu"):
    """(FinishedRun, family): the run's model built from its config, the latest checkpoint's weights with the
    synthesised ones laid over them (unet2d; the same build as the family's load_finished)."""
    from difftrain import registry
    from difftrain.engine import checkpoint as ckpt

    if cfg["model"]["name"] != "unet2d":
        raise UserError(f"ema-synth writes model=unet2d runs only so far; this run is model={cfg['model']['name']} "
                        "(use a unet2d run, or combine the snapshot files yourself with the weights it prints)")
    from difftrain.config.schema import UNet2DConfig
    from difftrain.families.unet2d import FinishedUNet2D

    latest = ckpt.resolve_resume("latest", root)
    if latest is None:
        raise UserError(f"run '{root}' has no complete checkpoint to take the model's other weights from")
    base = ckpt.read_tensors(latest, "model.safetensors")
    unknown = sorted(set(tensors) - set(base))
    if unknown:
        raise UserError(f"the snapshots name weights the model lacks ({unknown[:3]}); they belong to another run")
    base.update(tensors)
    family = registry.get("model", "unet2d").load()(UNet2DConfig(**{**cfg["model"], "pretrained": None}))
    family.load_checkpoint_tensors(family.module, base)
    family.size = (int(cfg["data"]["resolution"]),) * 2
    family.module.to(device).eval()
    return FinishedUNet2D(family, registry.build("scheduler", cfg["scheduler"]), device), family


def write_model(out: Path, run, synthesis: Synthesis) -> Path:
    """out/unet (UNet2DModel folder), out/scheduler and out/synthesis.json (weights and fit error)."""
    out.mkdir(parents=True, exist_ok=True)
    run.unet2d.module.save_pretrained(out / "unet")
    scheduler = getattr(run.schedule, "scheduler", None)
    if scheduler is not None:
        scheduler.save_pretrained(out / "scheduler")
    (out / "synthesis.json").write_text(json.dumps({
        "sigma_rel": synthesis.sigma_rel, "gamma": synthesis.gamma, "step": synthesis.step,
        "fit_error": synthesis.fit_error, "weights": dict(synthesis.weights)}, indent=2))
    return out


def target_folder(out_root: Path, sigma_rel: float, step: int) -> Path:
    return out_root / f"sigma_rel-{sigma_rel:.4f}-step-{step}"


def synth_all(root: Path, cfg: dict, sigma_rels: list[float], step: int | None, out_root: Path,
              device: str = "cpu") -> list[tuple[Synthesis, Path, object]]:
    """ema-synth: one model folder per target; returns (synthesis, folder, FinishedRun) per target."""
    snapshots = list_snapshots(root)
    done = []
    for sigma in sigma_rels:
        synthesis = synthesize(snapshots, sigma, step)
        run, _ = load_synthesized(root, cfg, synthesis.tensors, device)
        folder = write_model(target_folder(out_root, sigma, synthesis.step), run, synthesis)
        synthesis.tensors = {}  # written: do not keep every target's weights
        done.append((synthesis, folder, run))
    return done


def val_loss_of(cfg: dict, run, root: Path) -> float:
    """The fixed-noise validation loss of the run's config (validation.loss_*), on the synthesised weights."""
    from difftrain import registry
    from difftrain.engine.objective import DiffusionObjective
    from difftrain.engine.setup import cache_folder

    family = run.unet2d
    data = registry.build("data", cfg["data"], interpolation=registry.build("interpolation", cfg["interpolation"]),
                          seed=cfg["seed"], size_multiple=family.size_multiple, cache_folder=cache_folder(cfg, root))
    objective = DiffusionObjective(
        run.schedule, registry.build("weighting_scheme", cfg["weighting_scheme"]),
        registry.build("loss_weighting", cfg["loss_weighting"]), registry.build("dream", cfg["dream"]),
        noise_offset=cfg["noise"]["offset"], input_perturbation=cfg["noise"]["input_perturbation"])
    v = cfg["validation"]
    x0, cond = family.inputs(data.validation_batch(v["loss_batch_size"]), run.device)
    with torch.no_grad():
        return objective.validation_loss(family, family.module, x0, cond, v["loss_timesteps"], v["seed"])


def sweep(root: Path, cfg: dict, sigma_rels: list[float], metric: str, step: int | None, out_root: Path,
          device: str = "cpu") -> dict:
    """ema-sweep: synthesise and evaluate every sigma_rel; CSV, PNG (with matplotlib) and the best one."""
    from difftrain.engine.evaluation import digits_accuracy

    if metric == "accuracy" and (cfg["data"]["name"] != "digits" or not cfg["model"].get("num_class_embeds")):
        raise UserError("--metric accuracy is the digits-classifier accuracy: it needs a class-conditional run on "
                        "data=digits; use --metric val_loss for other runs")
    rows = []
    for synthesis, folder, run in synth_all(root, cfg, sigma_rels, step, out_root, device):
        if metric == "accuracy":
            e = cfg["eval"]
            value = digits_accuracy(run.generate, cfg["data"]["num_classes"], e["samples_per_label"],
                                    e["inference_steps"], e["seed"])["accuracy"]
        else:
            value = val_loss_of(cfg, run, root)
        rows.append({"sigma_rel": synthesis.sigma_rel, "gamma": synthesis.gamma, "step": synthesis.step,
                     metric: value, "fit_error": synthesis.fit_error, "model": str(folder)})
    best = (max if metric == "accuracy" else min)(rows, key=lambda r: r[metric])
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / "ema_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, metric, best, out_root / "ema_sweep.png")
    (out_root / "ema_sweep.json").write_text(json.dumps({"metric": metric, "best": best, "rows": rows}, indent=2))
    return {"rows": rows, "best": best, "csv": out_root / "ema_sweep.csv", "png": png}


def plot(rows: list[dict], metric: str, best: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed: no ema_sweep.png (pip install matplotlib for the plot)")
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["sigma_rel"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.axvline(best["sigma_rel"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel(metric)
    ax.set_title(f"post-hoc EMA at step {best['step']}: best sigma_rel {best['sigma_rel']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
