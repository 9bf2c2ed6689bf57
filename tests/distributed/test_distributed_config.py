"""The `distributed` group without launching anything: DeepSpeed config from the YAML, validation, argv and
the per-rank slicing of the global batch."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config

from difftrain.config.validate import ConfigError


def test_deepspeed_config_comes_from_the_yaml(tmp_path):
    from difftrain.engine.distributed import deepspeed_config

    cfg = tiny_config(tmp_path, "distributed=deepspeed_zero3", "distributed.offload_param=cpu",
                      "trainer.max_grad_norm=0.5", "trainer.mixed_precision=bf16", "trainer.grad_accum=2")
    ds = deepspeed_config(cfg["distributed"], cfg["trainer"], world_size=4)
    assert ds["gradient_clipping"] == 0.5  # trainer.max_grad_norm: DeepSpeed clips, not accelerate
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (8, 2, 8 * 2 * 4)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and "offload_optimizer" not in zero
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    cfg = tiny_config(tmp_path, "distributed=deepspeed_zero2", "trainer.max_grad_norm=null")
    ds = deepspeed_config(cfg["distributed"], cfg["trainer"], world_size=1)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 2
    assert "stage3_param_persistence_threshold" not in ds["zero_optimization"]


@pytest.mark.parametrize("overrides,message", [
    (["distributed=deepspeed_zero2", "distributed.offload_param=cpu"], "needs ZeRO-3"),
    (["distributed=deepspeed_zero3", "distributed.offload_optimizer=nvme"], "nvme_path"),
    (["distributed=deepspeed_zero2", "trainer.cpu=true"], "trainer.cpu=true cannot be combined with DeepSpeed"),
    (["distributed=deepspeed_zero2", "distributed.zero_stage=4"], "must be one of 1, 2, 3"),
    (["distributed.backend=ncl"], "must be one of nccl, gloo, mpi"),
    (["eval.objective=accuracyy"], "must be one of accuracy"),
])
def test_meaningless_distributed_settings_are_rejected(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)


def test_local_rank_argument_becomes_an_environment_variable(monkeypatch):
    from difftrain.cli.main import strip_local_rank

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"})
    assert strip_local_rank(["--local_rank=1", "train", "seed=3"]) == ["train", "seed=3"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["train", "--local-rank", "0", "seed=3"]) == ["train", "seed=3"]


def test_launcher_with_deepspeed_flag_needs_a_deepspeed_option(tmp_path, monkeypatch):
    from difftrain.engine.distributed import make_accelerator
    from difftrain.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="distributed=deepspeed_zero2"):
        make_accelerator(tiny_config(tmp_path))


def test_two_ranks_see_the_global_batch_of_one_process():
    """The batch of every step is the same 8 samples whether 1 process takes 8 or 2 processes take 4 each."""
    from difftrain.data.order import BatchOrder

    everything = [list(range(1797))]  # one bucket (with several, batches of 4 and of 8 are cut differently)
    one, two = BatchOrder(everything, 8, 2, 1, seed=0), BatchOrder(everything, 4, 2, 2, seed=0)
    for step in (0, 1, 111, 112, 500):  # across epoch boundaries too
        for micro in range(2):
            e1, i1 = one.indices(step, micro, 0)
            parts = [two.indices(step, micro, rank) for rank in (0, 1)]
            assert all(e == e1 for e, _ in parts)
            assert torch.equal(torch.cat([i for _, i in parts]), i1)
