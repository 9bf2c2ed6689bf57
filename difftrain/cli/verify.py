"""`difftrain verify RUN_DIR`: check every checkpoint, cache and EMA snapshot of a run against its checksums.

Checkpoints: the manifest's sizes and checksum (xxh3, or CRC-32) of every file (engine/checkpoint.py `verify`; a checkpoint
written before checksums existed is checked by size). Caches: every shard of each cache folder in the run's
cache folder and in its `data.cache_dir` (data/cache.py `verify_cache`). EMA snapshots (ema=posthoc): the CRC of
their tensors recorded in their metadata (engine/posthoc.py `read_snapshot`). Prints one table; exit status 0 when
everything verifies, 1 otherwise (a damaged checkpoint is skipped by resume=latest; a damaged cache folder
can be deleted, the next run rebuilds it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difftrain.errors import UserError


def _cache_folders(run: Path) -> list[Path]:
    folders = [run / "cache"]
    config = run / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        cache_dir = OmegaConf.to_container(OmegaConf.load(config)).get("data", {}).get("cache_dir")
        if cache_dir:
            folders.append(Path(cache_dir).expanduser())
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def verify_command(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from difftrain.data.cache import verify_cache
    from difftrain.engine import checkpoint as ckpt

    parser = argparse.ArgumentParser(prog="difftrain verify", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (with checkpoints/ and cache/)")
    opts = parser.parse_args(args)
    run = Path(opts.run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"'{run}' is not a folder; pass the folder of a run (outputs/<timestamp>)")
    rows = []
    root = run / "checkpoints"
    for path in sorted(root.glob("checkpoint-*") if root.is_dir() else [], key=lambda p: (len(p.name), p.name)):
        rows.append(("checkpoint", path.name, ckpt.verify(path)))
    snapshots = run / "ema_snapshots"
    if snapshots.is_dir():  # ema=posthoc
        from difftrain.engine.posthoc import read_snapshot

        for path in sorted(snapshots.glob("*.safetensors")):
            try:
                read_snapshot(path)
                rows.append(("ema snapshot", path.name, None))
            except ValueError as exc:
                rows.append(("ema snapshot", path.name, str(exc)))
    for folder in _cache_folders(run):
        for cache in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.split("-")[0] in ("latents", "text")):
            rows.append(("cache", str(cache.relative_to(run)) if cache.is_relative_to(run) else str(cache),
                         verify_cache(cache)))
    if not rows:
        raise UserError(f"'{run}' has no checkpoints and no caches to verify; is it a difftrain run folder?")
    table = Table(title=f"difftrain verify {run}")
    for column in ("kind", "name", "status"):
        table.add_column(column, overflow="fold")
    for kind, name, problem in rows:
        table.add_row(kind, name, "[green]ok[/green]" if problem is None else f"[red]{problem}[/red]")
    Console().print(table)
    return 1 if any(problem is not None for _, _, problem in rows) else 0
