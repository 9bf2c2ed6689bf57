"""`difftrain ema-synth` / `ema-sweep`: EMA profiles of any length from a run's post-hoc EMA snapshots.

The snapshots (RUN_DIR/ema_snapshots, written by components/posthoc_ema.PostHocEMA) are listed and checked
(metadata and CRC; a corrupt one is reported and skipped), the least-squares weights of each target profile
are solved in closed form (components/posthoc_ema.synthesis_weights), the snapshots are combined with those
weights one file at a time (float64 accumulator), and the result replaces the trainable weights of the run's
model, rebuilt from its config through the family protocol (`RebuiltRun`: the latest checkpoint's weights
for the rest), and written by the family's own `export`: a diffusers model folder (unet2d), a LoRA file
(`pipe.load_lora_weights(folder)`) or a whole pipeline (full text-to-image fine-tunes).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
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


@dataclass
class RebuiltRun:
    """The run's model family built and prepared as training did it (engine/setup.py `build_run`: the same
    registry options, `family.prepare` with the run's data, LoRA and validation prompts), without the optimizer,
    the caches, the data workers or a process group. ema-synth lays synthesised weights over its trainable
    ones and writes them with the family's own `export`; ema-sweep evaluates them in place."""

    cfg: dict
    family: object        # families.protocol.ModelFamily, prepared
    data: object          # data.sources.TrainingData of the run's data config
    schedule: object      # family.training_schedule(...) of the run
    accelerator: object   # a one-process Accelerator on `device` (the run's mixed precision)
    base: dict[str, torch.Tensor]  # the latest checkpoint's model tensors (what the snapshots do not cover)
    _loss_inputs: tuple | None = None

    @property
    def device(self):
        return self.accelerator.device

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """The synthesised trainable weights over the checkpoint's (family.load_checkpoint_tensors)."""
        unknown = sorted(set(tensors) - set(self.base))
        if unknown:
            raise UserError(f"the snapshots name weights the run's checkpoint lacks ({unknown[:3]}); they belong "
                            "to another run")
        self.family.load_checkpoint_tensors(self.family.module, {**self.base, **tensors})

    def export(self, folder: Path) -> None:
        """The family's export with the loaded weights (no EMA: they are the EMA): unet2d `unet/` + `scheduler/`;
        LoRA `pytorch_lora_weights.safetensors` + `scheduler/`; a full text-to-image fine-tune a whole pipeline."""
        self.family.export(folder, self.family.module, None, self.schedule)

    def generate(self, request):
        return self.family.generate(self.family.module, self.schedule, request, self.device)

    def val_loss(self) -> float:
        """The fixed-noise validation loss of the run's `validation.loss_*` settings on the loaded weights; the
        validation batch is encoded once (without the run's latent cache: through the VAE)."""
        from difftrain import registry
        from difftrain.engine.objective import DiffusionObjective

        cfg, v = self.cfg, self.cfg["validation"]
        objective = DiffusionObjective(
            self.schedule, registry.build("weighting_scheme", cfg["weighting_scheme"]),
            registry.build("loss_weighting", cfg["loss_weighting"]), registry.build("dream", cfg["dream"]),
            noise_offset=cfg["noise"]["offset"], input_perturbation=cfg["noise"]["input_perturbation"])
        if self._loss_inputs is None:
            self._loss_inputs = self.family.inputs(self.data.validation_batch(v["loss_batch_size"]), self.device)
        x0, cond = self._loss_inputs
        with torch.no_grad():
            return objective.validation_loss(self.family, self.family.module, x0, cond, v["loss_timesteps"], v["seed"])


def rebuild(root: Path, cfg: dict, device: str = "cpu") -> RebuiltRun:
    """RebuiltRun of RUN_DIR: the model from its config (a pretrained pipeline is loaded from where the run
    loaded it), its data indexed again (t2i families read the captions and the bucket sizes in `prepare`)."""
    from accelerate import Accelerator

    from difftrain import registry
    from difftrain.components.seeding import set_seed
    from difftrain.engine import checkpoint as ckpt
    from difftrain.engine.distributed import reset_accelerate_state
    from difftrain.engine.setup import cache_folder
    from difftrain.families.protocol import CacheOptions

    latest = ckpt.resolve_resume("latest", root)
    if latest is None:
        raise UserError(f"run '{root}' has no complete checkpoint to take the model's other weights from")
    precision = cfg["trainer"]["mixed_precision"]
    if device == "cpu" and precision == "fp16":
        precision = "no"  # fp16 needs a GPU; on the CPU the frozen parts stay fp32
    reset_accelerate_state()
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    set_seed(cfg["seed"])  # as build_run: the same initialisation before the weights are replaced
    family = registry.build("model", cfg["model"])
    data = registry.build("data", cfg["data"], interpolation=registry.build("interpolation", cfg["interpolation"]),
                          seed=cfg["seed"], size_multiple=family.size_multiple, cache_folder=cache_folder(cfg, root))
    schedule = family.training_schedule(registry.build("scheduler", cfg["scheduler"]))
    no_caches = CacheOptions(latents=False, text=False, folder=cache_folder(cfg, root), prune=False)
    family.prepare(data, accelerator, registry.build("lora", cfg["lora"]), no_caches,
                   list(cfg["validation"]["prompts"]))
    accelerator.prepare_model(family.module, evaluation_mode=True)  # on the device, autocast in forward
    family.module.eval()
    return RebuiltRun(cfg, family, data, schedule, accelerator, ckpt.read_tensors(latest, "model.safetensors"))


def write_target(out: Path, run: RebuiltRun, synthesis: Synthesis) -> Path:
    """The family's export of the synthesised weights into `out`, plus out/synthesis.json (weights, fit error)."""
    out.mkdir(parents=True, exist_ok=True)
    run.export(out)
    (out / "synthesis.json").write_text(json.dumps({
        "sigma_rel": synthesis.sigma_rel, "gamma": synthesis.gamma, "step": synthesis.step,
        "fit_error": synthesis.fit_error, "weights": dict(synthesis.weights)}, indent=2))
    return out


def target_folder(out_root: Path, sigma_rel: float, step: int) -> Path:
    return out_root / f"sigma_rel-{sigma_rel:.4f}-step-{step}"


def synth_all(root: Path, cfg: dict, sigma_rels: list[float], step: int | None, out_root: Path,
              device: str = "cpu") -> Iterator[tuple[Synthesis, Path, RebuiltRun]]:
    """ema-synth: one folder per target. Yields (synthesis, folder, run) with the target's weights loaded
    into `run` (one model for every target: evaluate it before taking the next)."""
    snapshots = list_snapshots(root)
    run = rebuild(root, cfg, device)
    for sigma in sigma_rels:
        synthesis = synthesize(snapshots, sigma, step)
        run.load(synthesis.tensors)
        folder = write_target(target_folder(out_root, sigma, synthesis.step), run, synthesis)
        synthesis.tensors = {}  # loaded and written: do not keep every target's weights
        yield synthesis, folder, run


def check_metric(cfg: dict, metric: str) -> None:
    if metric == "accuracy" and (cfg["data"]["name"] != "digits" or not cfg["model"].get("num_class_embeds")):
        raise UserError("--metric accuracy is the digits-classifier accuracy: it needs a class-conditional run on "
                        "data=digits; use --metric val_loss for other runs (text-to-image ones too)")


def sweep(root: Path, cfg: dict, sigma_rels: list[float], metric: str, step: int | None, out_root: Path,
          device: str = "cpu") -> dict:
    """ema-sweep: synthesise and evaluate every sigma_rel; CSV, PNG (with matplotlib) and the best one."""
    from difftrain.engine.evaluation import digits_accuracy

    check_metric(cfg, metric)
    rows = []
    for synthesis, folder, run in synth_all(root, cfg, sigma_rels, step, out_root, device):
        if metric == "accuracy":
            e = cfg["eval"]
            value = digits_accuracy(run.generate, cfg["data"]["num_classes"], e["samples_per_label"],
                                    e["inference_steps"], e["seed"])["accuracy"]
        else:
            value = run.val_loss()
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
