"""`difftrain push RUN_DIR --repo-id org/name [--private] [--token T]`: upload a finished run's final/ to the Hub.

final/README.md (the model card) is written again first, its snippet naming the repository; then
huggingface_hub's create_repo (exist_ok) + upload_folder (engine/model_card.py `push_final`). Without --repo-id
the run's `hub.repo_id` is used, without --private its `hub.private`; the token is --token, else HF_TOKEN or the
stored login. A bad repo id, a run without final/, no token or an unreachable Hub is one paragraph, exit 2,
before anything is uploaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difftrain.errors import UserError


def push_command(args: list[str]) -> int:
    from difftrain.engine.model_card import check_repo_id, push_final, read_run_config

    parser = argparse.ArgumentParser(prog="difftrain push", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run folder (with final/)")
    parser.add_argument("--repo-id", help="the model repository, org/name (default: the run's hub.repo_id)")
    parser.add_argument("--private", action="store_true", default=None,
                        help="create the repository private (default: the run's hub.private)")
    parser.add_argument("--token", help="a Hugging Face token with write access (default: HF_TOKEN or the login)")
    opts = parser.parse_args(args)
    run = Path(opts.run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"'{run}' is not a folder; pass the folder of a finished run (outputs/<timestamp>)")
    hub = read_run_config(run).get("hub") or {}
    repo_id = check_repo_id(opts.repo_id or hub.get("repo_id"))
    private = opts.private if opts.private is not None else bool(hub.get("private"))
    url = push_final(run, repo_id, private, opts.token)
    print(f"pushed {run / 'final'} to {repo_id}: {url}")
    return 0
