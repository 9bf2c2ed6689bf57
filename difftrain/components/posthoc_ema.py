"""Post-hoc EMA (Karras et al. 2024, "EDM2"): power-function EMA profiles, their snapshots and the maths
that recombines snapshots into an EMA of any other length after training (docs/ema.md, "Post-hoc EMA").

A profile with exponent gamma averages the trajectory theta(tau), 0 < tau <= t, with the density
p_t(tau) = (gamma+1) tau^gamma / t^(gamma+1). Its discrete update at optimizer step t is
theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma+1), which gives step tau
the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): exactly p_t integrated over (tau-1, tau].

`PostHocEMA` has the interface the engine uses for EMA (components/ema_factory.py: step, decay, swapped,
checkpoint_state, load_checkpoint_state); the "EMA weights" it swaps in are the first profile's.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import weakref
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from difftrain.components import ema_gather

SNAPSHOT_FORMAT = "difftrain.posthoc_ema/1"
SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_RE = re.compile(r"^step-(\d+)\.profile-(\d+)\.safetensors$")
#: fp32 bytes of parameters per update piece, by device type: small enough that the piece is still in cache
#: when the next profile reads it (CPU: L2; a GPU's L2 is tens of MiB), large enough that the per-piece cost
#: (an OpenMP region on the CPU) stays small. CPU measured (benchmarks/ema.py, docs/performance.md); the GPU
#: value is not measured yet.
UPDATE_PIECE_BYTES = {"cpu": 1 << 20}
UPDATE_PIECE_BYTES_ACCELERATOR = 16 << 20
#: fp32 bytes per fused call (bounds the fp32 temporaries of non-fp32 parameters, as EMAModel's CAST_CHUNK_BYTES)
CALL_BYTES = 64 << 20
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- sigma_rel <-> gamma ------------------------------------------------------------------------
def sigma_rel_of_gamma(gamma: float) -> float:
    """Standard deviation of the profile p_t divided by t: sqrt((g+1) / ((g+2)^2 (g+3)))."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def _gamma_at_max_sigma() -> float:
    """sigma_rel(gamma) rises from 0 at gamma=-1 to a maximum (~0.3002 near gamma=-0.37), then falls to 0."""
    lo, hi = -0.999, 5.0
    for _ in range(200):  # ternary search on a unimodal function
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if sigma_rel_of_gamma(a) < sigma_rel_of_gamma(b):
            lo = a
        else:
            hi = b
    return (lo + hi) / 2


GAMMA_AT_MAX = _gamma_at_max_sigma()
SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_MAX)


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The gamma >= GAMMA_AT_MAX with sigma_rel_of_gamma(gamma) == sigma_rel (bisection on the falling branch,
    i.e. the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2))."""
    s = float(sigma_rel)
    if not 0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    lo, hi = GAMMA_AT_MAX, 1.0
    while sigma_rel_of_gamma(hi) > s:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sigma_rel_of_gamma(mid) > s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta(gamma: float, t: int) -> float:
    """Decay of the power-function EMA at optimizer step t >= 1 (0 at t=1: the first step copies)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def step_weights(gamma: float, t: int) -> list[float]:
    """The weight of each step tau = 1..t in the profile at step t (they sum to 1)."""
    e = gamma + 1.0
    return [(tau**e - (tau - 1) ** e) / t**e for tau in range(1, t + 1)]


# ---- least-squares synthesis ----------------------------------------------------------------------
def profile_inner(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """<p_a, p_b> = integral over 0 < tau <= min(t_a, t_b) of p_a(tau) p_b(tau)
    = (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)), m = min(t_a, t_b); in logs."""
    m, s = min(t_a, t_b), gamma_a + gamma_b + 1.0
    log = (math.log((gamma_a + 1) * (gamma_b + 1) / s) + s * math.log(m)
           - (gamma_a + 1) * math.log(t_a) - (gamma_b + 1) * math.log(t_b))
    return math.exp(log)


def synthesis_weights(snapshots: Sequence[tuple[float, int]], target: tuple[float, int]) -> tuple[list[float], float]:
    """Weights x of the snapshot profiles (gamma_i, t_i) that best match the target profile (gamma, t) in L2:
    A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (least squares, float64), then normalised to sum 1.
    Returns (x, relative fit error ||sum x_i p_i - p_target|| / ||p_target||)."""
    import numpy as np

    if not snapshots:
        raise ValueError("no snapshots to synthesise from")
    g, t = target
    a = np.array([[profile_inner(gi, ti, gj, tj) for gj, tj in snapshots] for gi, ti in snapshots])
    b = np.array([profile_inner(gi, ti, g, t) for gi, ti in snapshots])
    scale = np.sqrt(np.diag(a))  # equilibrate: A is badly scaled when the profiles' peaks differ a lot
    x = np.linalg.lstsq(a / np.outer(scale, scale), b / scale, rcond=1e-12)[0] / scale
    if abs(x.sum()) > 1e-12:
        x = x / x.sum()
    c = profile_inner(g, t, g, t)
    residual = max(float(x @ a @ x - 2 * x @ b + c), 0.0)
    return [float(v) for v in x], math.sqrt(residual / c)


# ---- the fused update ------------------------------------------------------------------------------
_SCALAR_LIST: list[bool] = []  # whether _foreach_lerp_ takes one weight per tensor (newer torch), tested once


def lerp_profiles(shadows: list[torch.Tensor], pieces: list[torch.Tensor], weights: list[float]) -> None:
    """shadows[j*K + k] <- lerp(shadows[j*K + k], pieces[j], weights[k]) for K = len(weights) profiles: one
    `_foreach_lerp_` with a weight per tensor, in the order piece 1 of every profile, piece 2 of every
    profile, ... (each piece is read again while it is in cache); on an older torch, one call per profile."""
    k = len(weights)
    if not _SCALAR_LIST:
        try:
            torch._foreach_lerp_([torch.zeros(1)], [torch.ones(1)], [0.5])
            _SCALAR_LIST.append(True)
        except (TypeError, RuntimeError):
            _SCALAR_LIST.append(False)
    if _SCALAR_LIST[0]:
        torch._foreach_lerp_(shadows, [p for p in pieces for _ in range(k)], weights * len(pieces))
    else:
        for j, w in enumerate(weights):
            torch._foreach_lerp_(shadows[j::k], pieces, w)


# ---- the EMA object -------------------------------------------------------------------------------
class PostHocEMA:
    """Power-function EMAs (one per sigma_rel) of a model's trainable parameters, fp32 shadows, snapshotted.

    `bind_run(run_dir, is_main, max_steps)` (called by the Trainer) enables snapshots: every `snapshot_every`
    optimizer steps, and at `max_steps`, rank 0 writes each profile to RUN_DIR/ema_snapshots/."""

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float], snapshot_every: int,
                 snapshot_dtype: str = "fp32", gather_bucket_bytes: int = ema_gather.DEFAULT_GATHER_BUCKET_BYTES):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.snapshot_every, self.snapshot_dtype = int(snapshot_every), snapshot_dtype
        self.gather_bucket_bytes = int(gather_bucket_bytes)
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = self._params(model)
        shapes = [torch.Size(getattr(p, "ds_shape", p.shape)) for p in params]  # ZeRO-3: the full shape
        self.shadows = [[torch.empty(s, dtype=torch.float32, device=p.device) for s, p in zip(shapes, params)]
                        for _ in self.gammas]
        with torch.no_grad():
            for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
                for i in group:
                    for shadow in self.shadows:
                        shadow[i].copy_(params[i].detach())
        self.optimization_step = 0
        self.run_dir: Path | None = None
        self.is_main, self.max_steps = True, None
        self.update_piece_bytes: int | None = None  # None: UPDATE_PIECE_BYTES of the shadows' device type
        self._plans: dict[tuple[int, ...], list] = {}  # group -> pieces and shadow views (shadows are ours)
        self._param_views: dict[tuple[int, ...], tuple] = {}  # group -> (storage pointers, parameter views)
        self._resolved: tuple | None = None  # (weakref to the model, its tracked parameters)

    def bind_run(self, run_dir: Path, is_main: bool, max_steps: int | None = None) -> None:
        self.run_dir, self.is_main, self.max_steps = Path(run_dir), bool(is_main), max_steps

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.param_names]

    def _step_params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """`_params` resolved once per model object (the engine passes the same one every step; walking
        named_parameters() costs ~5 us per parameter, milliseconds per step for a LoRA's thousands)."""
        if self._resolved is not None and self._resolved[0]() is model:
            return self._resolved[1]
        params = self._params(model)
        self._resolved = (weakref.ref(model), params)
        return params

    @property
    def decay(self) -> float:
        """beta of the first profile at the last step (what the metrics log calls ema_decay)."""
        return beta(self.gammas[0], self.optimization_step) if self.optimization_step else 0.0

    # ---- update ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        params = self._step_params(model)
        self.optimization_step += 1
        weights = [1.0 - beta(g, self.optimization_step) for g in self.gammas]
        model_params = list(params)  # a gather may swap full tensors into `params` for a group's duration
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
            self._update(group, params, weights, model_params)
        t = self.optimization_step
        if self.run_dir is not None and self.is_main and (t % self.snapshot_every == 0 or t == self.max_steps):
            self.write_snapshots()

    def _update(self, group: list[int], params: list[torch.Tensor], weights: list[float],
                model_params: list[torch.Tensor]) -> None:
        """Every profile from one read of each parameter: the parameters are cut into pieces of at most
        `update_piece_bytes` (flat views; big tensors split), and one fused `_foreach_lerp_` per call chunk
        updates piece 1 of every profile, then piece 2 of every profile, ...: each piece is read from memory
        once and from cache for the other profiles. Non-fp32 pieces are cast once, a call chunk at a time."""
        key = tuple(group)
        plan = self._plan(key, params)
        for (_, shadow_views), ps in zip(plan, self._views_of_params(key, params, plan, model_params)):
            s_dev = shadow_views[0].device
            if ps[0].dtype != torch.float32 or ps[0].device != s_dev:  # a call chunk has one dtype and device
                ps = [p.to(device=s_dev, dtype=torch.float32) for p in ps]
            lerp_profiles(shadow_views, ps, weights)

    def _views_of_params(self, key: tuple[int, ...], params: list[torch.Tensor], plan: list,
                         model_params: list[torch.Tensor]) -> list:
        """The parameter pieces of `plan`, as views; kept while every parameter keeps its storage, and only for
        the model's own, ungathered parameters (a gathered full tensor is freed after its group: not held)."""
        pointers = tuple(params[i].data_ptr() for i in key)
        cached = self._param_views.get(key)
        if cached is not None and cached[0] == pointers:
            return cached[1]
        views = [[params[i].detach() if a is None or (a == 0 and b == params[i].numel())
                  else params[i].detach().reshape(-1)[a:b] for i, a, b in pieces] for pieces, _ in plan]
        if all(params[i] is model_params[i] and not ema_gather.is_zero3_param(params[i]) for i in key):
            self._param_views[key] = (pointers, views)
        return views

    def _plan(self, group: tuple[int, ...], params: list[torch.Tensor]) -> list:
        """[(pieces, shadow views)] of a group, computed once, one entry per call chunk (at most CALL_BYTES of
        fp32, one device and dtype): pieces (i, start, stop) of the flattened parameter i ((i, None, None): the
        whole tensor, when it is not contiguous), and the shadow views piece by piece, every profile's."""
        plan = self._plans.get(group)
        if plan is not None:
            return plan
        buckets: dict[tuple, list[int]] = {}
        for i in group:
            p = params[i]
            buckets.setdefault((self.shadows[0][i].device, p.device, p.dtype), []).append(i)
        plan = []
        for (device, _, _), indices in buckets.items():
            piece = self.update_piece_bytes or UPDATE_PIECE_BYTES.get(device.type, UPDATE_PIECE_BYTES_ACCELERATOR)
            piece_numel, call_numel = max(1, piece // 4), max(1, CALL_BYTES // 4)
            pieces, used = [], 0
            for i in indices:
                n = self.shadows[0][i].numel()
                spans = [(None, None)] if not params[i].is_contiguous() else [
                    (start, min(start + piece_numel, n)) for start in range(0, n, piece_numel)]
                for a, b in spans:
                    pieces.append((i, a, b))
                    used += n if a is None else b - a
                    if used >= call_numel:
                        plan.append(self._views(pieces))
                        pieces, used = [], 0
            if pieces:
                plan.append(self._views(pieces))
        self._plans[group] = plan
        return plan

    def _views(self, pieces: list[tuple]) -> tuple[list[tuple], list[torch.Tensor]]:
        """(pieces, shadow views [piece 1 of every profile, piece 2 of every profile, ...]); a whole tensor
        keeps its shape (so does its parameter's view)."""
        return pieces, [shadow[i] if a is None or (a == 0 and b == shadow[i].numel()) else shadow[i].view(-1)[a:b]
                        for i, a, b in pieces for shadow in self.shadows]

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot_folder(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / SNAPSHOT_DIR

    def write_snapshots(self) -> list[Path]:
        """One safetensors file per profile (tmp file, fsync, os.replace); one profile on the host at a time."""
        folder = self.snapshot_folder()
        folder.mkdir(parents=True, exist_ok=True)
        return [write_snapshot(folder, self.optimization_step, k, self.gammas[k], self.sigma_rels[k],
                               dict(zip(self.param_names, shadow)), self.snapshot_dtype)
                for k, shadow in enumerate(self.shadows)]

    def drop_snapshots_after(self, step: int) -> None:
        """On resume: snapshots newer than the checkpoint (from the interrupted run) are rewritten by the
        resumed one; remove them and any temporary file so the list is exactly the uninterrupted run's."""
        if self.run_dir is None or not self.is_main or not self.snapshot_folder().is_dir():
            return
        for path in self.snapshot_folder().iterdir():
            match = SNAPSHOT_RE.match(path.name)
            if path.name.endswith(".tmp") or (match and int(match.group(1)) > step):
                path.unlink()

    # ---- swap and checkpoint -------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[None]:
        """The first profile's weights inside; the live weights restored after, always."""
        params = self._params(model)
        with torch.no_grad():
            stored: list[torch.Tensor | None] = [None] * len(params)
            for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=None):
                for i in group:
                    stored[i] = params[i].detach().to("cpu", copy=True)
            try:
                self._write(params, self.shadows[0])
                yield
            finally:
                self._write(params, stored)

    def _write(self, params: list[torch.Tensor], values) -> None:
        for group in ema_gather.iter_gathered(params, self.gather_bucket_bytes, modifier_rank=0):
            for i in group:
                params[i].data.copy_(values[i])

    @staticmethod
    def _key(profile: int, name: str) -> str:
        """Checkpoint key: the first profile (the run's EMA weights) under the parameter's own name, so readers
        that lay ema.safetensors over the model's weights get it; the others under profile<k>/<name>."""
        return name if profile == 0 else f"profile{profile}/{name}"

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {self._key(k, name): t.detach().clone()
                   for k, shadow in enumerate(self.shadows) for name, t in zip(self.param_names, shadow)}
        meta = {"format": SNAPSHOT_FORMAT, "optimization_step": self.optimization_step,
                "sigma_rels": self.sigma_rels, "gammas": self.gammas, "snapshot_every": self.snapshot_every}
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("sigma_rels") != self.sigma_rels:
            raise ValueError(f"the checkpoint's EMA is not ema=posthoc with sigma_rels={self.sigma_rels} "
                             f"(it has {meta.get('sigma_rels')})")
        expected = {self._key(k, n) for k in range(len(self.shadows)) for n in self.param_names}
        if set(tensors) != expected:
            raise KeyError(f"EMA state mismatch: missing {sorted(expected - set(tensors))[:3]}, "
                           f"unexpected {sorted(set(tensors) - expected)[:3]}")
        with torch.no_grad():
            for k, shadow in enumerate(self.shadows):
                for name, s in zip(self.param_names, shadow):
                    s.copy_(tensors[self._key(k, name)])
        self.optimization_step = int(meta["optimization_step"])
        self.drop_snapshots_after(self.optimization_step)


def tensor_crc(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes in key order (stored in a snapshot's metadata, checked when read)."""
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(tensors[key].reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return f"{crc:08x}"


def write_snapshot(folder: Path, step: int, profile: int, gamma: float, sigma_rel: float,
                   named: dict[str, torch.Tensor], dtype: str) -> Path:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu", dtype=_DTYPES[dtype]).contiguous() for k, v in named.items()}
    meta = {"format": SNAPSHOT_FORMAT, "step": str(step), "profile": str(profile), "gamma": repr(gamma),
            "sigma_rel": repr(sigma_rel), "dtype": dtype, "crc32": tensor_crc(cpu)}
    final = folder / f"step-{step:09d}.profile-{profile}.safetensors"
    tmp = folder / f".{final.name}.tmp"
    save_file(cpu, str(tmp), metadata=meta)
    del cpu
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final
