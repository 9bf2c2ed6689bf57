import os
import random

import numpy as np
import pytest
import torch

from difftrain.components.seeding import CUBLAS_WORKSPACE_CONFIG, make_generator, seed_for, set_seed


@pytest.fixture
def restore_torch_flags():
    """set_seed(deterministic=True) changes process-global flags: put them back after the test."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic = saved[2]
    torch.backends.cudnn.benchmark = saved[3]
    torch.backends.cuda.matmul.allow_tf32 = saved[4]
    torch.backends.cudnn.allow_tf32 = saved[5]
    torch.set_float32_matmul_precision(saved[6])


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_set_seed_repeats_python_numpy_torch_draws():
    set_seed(1234)
    first = _draws()
    set_seed(1234)
    second = _draws()
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])
    set_seed(1235)
    assert _draws()[0] != first[0]


def test_set_seed_default_does_not_touch_determinism_flags(restore_torch_flags):
    torch.use_deterministic_algorithms(False)
    set_seed(0)
    assert not torch.are_deterministic_algorithms_enabled()


def test_set_seed_deterministic_sets_flags(restore_torch_flags, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    set_seed(7, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG == ":4096:8"


def test_set_seed_deterministic_keeps_existing_cublas_config(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_seed(7, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_set_seed_deterministic_is_keyword_only():
    with pytest.raises(TypeError):
        set_seed(0, True)


def test_seed_for_is_stable_and_pinned():
    # Pinned: sha256("0:0:noise")[:8] as little-endian, top bit cleared. Must never change between versions,
    # or resumed runs would draw different noise.
    assert seed_for(0) == seed_for(0, 0, "noise") == 3218406761630846891
    assert seed_for(42, rank=3, stream="timesteps") == seed_for(42, 3, "timesteps")


def test_seed_for_separates_ranks_and_streams():
    seeds = {seed_for(s, r, k) for s in (0, 1) for r in range(8) for k in ("noise", "timesteps", "dropout")}
    assert len(seeds) == 2 * 8 * 3
    # the seed+rank collision that a naive scheme has
    assert seed_for(0, rank=1) != seed_for(1, rank=0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_seed_for_validates_arguments():
    with pytest.raises(TypeError):
        seed_for(1.5)
    with pytest.raises(TypeError):
        seed_for(True)
    with pytest.raises(ValueError):
        seed_for(0, rank=-1)
    assert seed_for(np.int64(5)) == seed_for(5)


def test_make_generator_matches_manual_seed_and_is_independent_of_global_rng():
    gen = make_generator(seed_for(3, 0, "noise"))
    assert gen.device == torch.device("cpu")
    ref = torch.Generator().manual_seed(seed_for(3, 0, "noise"))
    torch.manual_seed(999)  # the global RNG must not matter
    assert torch.equal(torch.randn(16, generator=gen), torch.randn(16, generator=ref))


def test_per_rank_generators_draw_different_noise():
    noise = [torch.randn(64, generator=make_generator(seed_for(0, rank))) for rank in range(2)]
    assert not torch.equal(noise[0], noise[1])
