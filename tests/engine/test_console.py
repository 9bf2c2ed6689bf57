"""A quiet console: a real `difftrain train` process shows difftrain's lines only; the library warnings and log
records it hid are in RUN_DIR/train.log; DeepSpeed is not even imported by a DDP run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import TINY, cli_env

# a library that warns and logs during the run (deterministically: at every validation grid), as
# torchvision, diffusers or DeepSpeed do; then the CLI exactly as `difftrain train ...` runs it
SCRIPT = """
import json, logging, sys, warnings
import torchvision.utils as tv
save_image = tv.save_image
def noisy_save_image(*args, **kwargs):
    warnings.warn("torchvision-like library: this call is deprecated", UserWarning)
    logging.getLogger("diffusers.fake_module").warning("a library log record")
    return save_image(*args, **kwargs)
tv.save_image = noisy_save_image
import atexit
result = sys.argv[1]  # `difftrain train` replaces sys.argv for Hydra
atexit.register(lambda: json.dump({"deepspeed_imported": "deepspeed" in sys.modules}, open(result, "w")))
from difftrain.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
PROGRESS = re.compile(r"^train step (\d)/4  loss (\d\.\d{4})  lr \d\.\d{2}e[-+]\d{2}  \d+\.\d it/s$")
THIRD_PARTY = ("[WARNING]", "Setting accelerator", "W1", "Unable to import", "UserWarning", "Loading pipeline",
               "Writing model shards", "it/s]", "wandb:", "torchvision-like", "a library log record")


def test_plain_progress_lines_and_nothing_from_the_libraries(tmp_path):
    run_dir, result = tmp_path / "run", tmp_path / "result.json"
    overrides = [o for o in TINY if o != "trainer.progress=false"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(result), "train", *overrides, f"output_dir={run_dir}",
                           "trainer.progress=false", "trainer.validate_every=2", "eval.enabled=false"],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(result.read_text()) == {"deepspeed_imported": False}
    assert proc.stderr == ""  # no library warning, log record or bar
    lines = proc.stdout.splitlines()
    progress = [PROGRESS.match(line) for line in lines if line.startswith("train ")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(int(m[1]), m[2]) for m in progress] == [(r["step"], f"{r['loss']:.4f}") for r in metrics if "loss" in r]
    export = lines[len(progress):len(progress) + 2]  # then the export phase's two lines (difftrain/progress.py)
    assert export[0] == "export final/: start" and re.fullmatch(r"export final/: done in \d+\.\d s", export[1]), lines
    table = lines[len(progress) + 2:]  # then the run's summary table, nothing else
    assert table[0].strip() == "difftrain run" and all(line[0] in "┌│├└" for line in table[1:]), lines
    assert not [line for line in lines if line.startswith(THIRD_PARTY)]
    log = (run_dir / "train.log").read_text()
    assert log.count("UserWarning: torchvision-like library: this call is deprecated") == 1  # once: Python's default filter
    assert log.count("WARNING diffusers.fake_module: a library log record") == 2
    assert [line.split(": ", 1)[1] for line in log.splitlines() if " difftrain.progress: " in line] == \
        [line for line in lines if line.startswith("train ")]


def test_difftrain_own_warnings_still_reach_the_console(capfd):
    import warnings

    from difftrain.engine.run_files import quiet_console

    quiet_console()
    warnings.warn("difftrain: image 'a.png' cannot be decoded any more", UserWarning, stacklevel=1)  # as samples.py
    warnings.warn("some library says hello", UserWarning, stacklevel=1)  # hidden: not from difftrain
    err = capfd.readouterr().err
    assert err == "difftrain: warning: image 'a.png' cannot be decoded any more\n"
