"""Rules of the run as a whole: resume, the Hub upload, experiment trackers. Part of the one rule list,
config/rules.py RULES (one function per rule, its docstring the line in docs/configuration.md). No torch.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.config.rule_helpers import node_of


def resume_needs_output_dir(cfg: dict) -> list[str]:
    """`resume` needs `output_dir`: the existing folder of the run to continue."""
    if not cfg.get("resume"):
        return []
    if not cfg.get("output_dir"):
        return ["resume needs output_dir: pass the run folder to continue, "
                "e.g. output_dir=outputs/2026-01-01_12-00-00 resume=latest"]
    if not Path(cfg["output_dir"]).expanduser().is_dir():
        return [f"resume={cfg['resume']} but output_dir '{cfg['output_dir']}' does not exist; "
                "pass the folder of the run to continue"]
    return []


def hub_push_needs_a_repo_id(cfg: dict) -> list[str]:
    """`hub.push_on_finish` needs `hub.repo_id`, and a repo id is a valid Hugging Face one (org/name)."""
    hub = node_of(cfg, "hub")
    repo_id = hub.get("repo_id")
    if hub.get("push_on_finish") and not repo_id:
        return ["hub.push_on_finish=true needs hub.repo_id=org/name, the model repository to upload final/ to"]
    if repo_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            return [f"hub.repo_id='{repo_id}' is not a Hugging Face repo id: use org/name with letters, digits, "
                    "'-', '_' and '.'"]
    return []


def _missing_tracker_message(name: str) -> str | None:
    """The install hint for a tracker whose package is not importable (None when it is, or is unknown)."""
    import importlib.util

    from difftrain.config.schema import TRACKERS

    if name not in TRACKERS or importlib.util.find_spec(TRACKERS[name]) is not None:
        return None
    extra = f'"difftrain[{name}]"' if name in ("wandb", "mlflow") else TRACKERS[name]
    return (f"logging.report_to has '{name}' but the {TRACKERS[name]} package is not installed; install it with "
            f"pip install {extra} (or remove '{name}' from logging.report_to)")


def trackers_known_and_installed(cfg: dict) -> list[str]:
    """`logging.report_to` names each tracker once, from accelerate's list, and each one's package is installed."""
    from difftrain.config.schema import TRACKERS

    names = node_of(cfg, "logging").get("report_to", [])
    errors = [f"logging.report_to: '{n}' is not a tracker; choose from {', '.join(TRACKERS)}"
              for n in dict.fromkeys(names) if n not in TRACKERS]
    if len(set(names)) != len(names):
        errors.append(f"logging.report_to={names} names a tracker twice; list each once")
    return errors + [m for m in map(_missing_tracker_message, dict.fromkeys(names)) if m]
