"""Post-hoc EMA maths and the PostHocEMA object (components/posthoc_ema.py, engine/posthoc.py synthesis)."""

from __future__ import annotations

import math

import pytest
import torch

from difftrain.components import posthoc_ema as ph


def test_sigma_rel_gamma_round_trip():
    for sigma in (0.01, 0.05, 0.1, 0.15, 0.2, 0.28, ph.SIGMA_REL_MAX):
        assert ph.sigma_rel_of_gamma(ph.gamma_of_sigma_rel(sigma)) == pytest.approx(sigma, rel=1e-9)
    for gamma, sigma in ((16.97, 0.05), (6.94, 0.10), (3.56, 0.15), (1.83, 0.20)):  # EDM2's anchors
        assert ph.gamma_of_sigma_rel(sigma) == pytest.approx(gamma, abs=0.01)
    g = ph.gamma_of_sigma_rel(0.1)  # the largest real root of the cubic
    s2 = 0.1**-2
    assert g**3 + 7 * g**2 + (16 - s2) * g + (12 - s2) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        ph.gamma_of_sigma_rel(0.31)


def _scalar_model(value: float) -> torch.nn.Module:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64).float())
    return model


def test_discrete_update_is_the_power_function_average():
    torch.manual_seed(0)
    values = torch.randn(300, dtype=torch.float64).cumsum(0)
    model = _scalar_model(0.0)
    ema = ph.PostHocEMA(model, [0.05, 0.15], snapshot_every=10**9)
    for v in values:
        model.w.data.fill_(float(v))
        ema.step(model)
    for k, gamma in enumerate(ema.gammas):
        weights = torch.tensor(ph.step_weights(gamma, len(values)), dtype=torch.float64)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        closed = float(weights @ values.float().double())
        assert float(ema.shadows[k][0]) == pytest.approx(closed, rel=1e-5, abs=1e-5)
    assert ema.decay == pytest.approx((1 - 1 / 300) ** (ema.gammas[0] + 1))


def test_inner_product_matches_quadrature():
    for ga, ta, gb, tb in ((6.9, 100, 17.0, 60), (1.8, 40, 5.0, 90), (3.0, 50, 3.0, 50)):
        n = 200000
        m = min(ta, tb)
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * m / n
        pa = (ga + 1) * tau**ga / ta ** (ga + 1)
        pb = (gb + 1) * tau**gb / tb ** (gb + 1)
        assert ph.profile_inner(ga, ta, gb, tb) == pytest.approx(float((pa * pb).sum() * m / n), rel=1e-6)


def test_target_equal_to_a_stored_profile_gives_that_snapshot():
    gammas = [ph.gamma_of_sigma_rel(0.05), ph.gamma_of_sigma_rel(0.10)]
    snaps = [(g, t) for t in (100, 200, 300, 400) for g in gammas]
    x, error = ph.synthesis_weights(snaps, (gammas[1], 300))
    assert error < 1e-6
    assert x[snaps.index((gammas[1], 300))] == pytest.approx(1.0, abs=1e-4)
    assert sum(abs(v) for v in x) == pytest.approx(1.0, abs=1e-3)


def test_synthesis_between_the_tracked_profiles_matches_brute_force(tmp_path):
    """A tiny regression trained by SGD, every step's weights kept: sigma_rel 0.075 synthesised from the
    0.05/0.10 snapshots (every 10 of 200 steps) is within 0.5% of the brute-force power-function average
    (measured: 0.01%),
    relative to how far the two tracked profiles are apart (a different sigma_rel is much further)."""
    from difftrain.engine.posthoc import list_snapshots, synthesize

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_all, w_true = torch.randn(512, 6), torch.randn(6, 3)
    ema = ph.PostHocEMA(model, [0.05, 0.10], snapshot_every=10)
    ema.bind_run(tmp_path, True, 200)
    trajectory = []
    for _ in range(200):
        idx = torch.randint(0, 512, (16,))
        loss = ((model(x_all[idx]) - x_all[idx] @ w_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model)
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]).double())
    traj = torch.stack(trajectory)

    def brute(sigma):
        return torch.tensor(ph.step_weights(ph.gamma_of_sigma_rel(sigma), 200), dtype=torch.float64) @ traj

    result = synthesize(list_snapshots(tmp_path), 0.075)
    synth = torch.cat([result.tensors[n].flatten() for n, _ in model.named_parameters()]).double()
    spread = float((brute(0.05) - brute(0.10)).norm())
    assert result.fit_error < 0.01  # measured 0.0023
    assert float((synth - brute(0.075)).norm()) < 0.005 * spread
    assert float((synth - brute(0.05)).norm()) > 0.2 * spread


def test_corrupt_snapshot_is_reported_and_skipped(tmp_path, capsys):
    from difftrain.engine.posthoc import list_snapshots

    model = torch.nn.Linear(4, 4)
    ema = ph.PostHocEMA(model, [0.05, 0.10], snapshot_every=1, snapshot_dtype="bf16")
    ema.bind_run(tmp_path, True)
    for _ in range(3):
        ema.step(model)
    folder = tmp_path / ph.SNAPSHOT_DIR
    flipped, truncated = folder / "step-000000002.profile-0.safetensors", folder / "step-000000003.profile-1.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:40])
    snaps = list_snapshots(tmp_path)
    assert {(s.step, s.profile) for s in snaps} == {(1, 0), (1, 1), (2, 1), (3, 0)}
    err = capsys.readouterr().err
    assert flipped.name in err and truncated.name in err and "CRC" in err


def test_checkpoint_state_round_trip_and_mismatch():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # trainable-only, like LoRA
    ema = ph.PostHocEMA(model, [0.05, 0.10], snapshot_every=100)
    assert ema.param_names == ["weight"]
    for _ in range(3):
        model.weight.data.add_(1.0)
        ema.step(model)
    tensors, meta = ema.checkpoint_state()
    other = ph.PostHocEMA(model, [0.05, 0.10], snapshot_every=100)
    other.load_checkpoint_state(tensors, meta)
    assert other.optimization_step == 3 and all(
        torch.equal(a[0], b[0]) for a, b in zip(ema.shadows, other.shadows))
    with pytest.raises(ValueError):
        ph.PostHocEMA(model, [0.05, 0.2], snapshot_every=100).load_checkpoint_state(tensors, meta)
    live = model.weight.detach().clone()
    with ema.swapped(model):
        assert torch.equal(model.weight, ema.shadows[0][0])
    assert torch.equal(model.weight, live)
    assert not math.isnan(ema.decay)


@pytest.mark.parametrize("one_call", [True, False], ids=["weight-per-tensor", "call-per-profile"])
def test_update_in_pieces_equals_a_whole_tensor_lerp_per_profile(one_call, monkeypatch):
    """The read-once update (pieces of update_piece_bytes, a big tensor split, a non-contiguous and a bf16
    parameter, cached parameter views) is bitwise the plain per-tensor lerp of every profile, also after a
    parameter gets new storage; with one fused call per chunk and with the older torch's call per profile."""
    monkeypatch.setattr(ph, "_SCALAR_LIST", [one_call])
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.big = torch.nn.Parameter(torch.randn(300, 200))
    model.small = torch.nn.Parameter(torch.randn(7))
    model.strided = torch.nn.Parameter(torch.randn(20, 30).t())
    model.bf16 = torch.nn.Parameter(torch.randn(50, 3).bfloat16())
    assert not model.strided.is_contiguous()
    ema = ph.PostHocEMA(model, [0.05, 0.10, 0.2], snapshot_every=10**9)
    ema.update_piece_bytes = 4096  # 1024 elements: `big` in 59 pieces
    reference = [[s.clone() for s in shadow] for shadow in ema.shadows]
    params = [p for _, p in model.named_parameters()]
    for t in range(1, 7):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
            if t == 4:
                model.big.data = model.big.data.clone()  # new storage: the cached views are rebuilt
        ema.step(model)
        for shadow, gamma in zip(reference, ema.gammas):
            for s, p in zip(shadow, params):
                s.lerp_(p.detach().float(), 1.0 - ph.beta(gamma, t))
    pieces, views = ema._plans[(0, 1, 2, 3)][0]  # the fp32 call chunk: `big` in 59 pieces, `small`, `strided`
    assert len(pieces) == 61 and len(views) == 3 * 61
    for mine, ref in zip(ema.shadows, reference):
        assert all(torch.equal(a, b) for a, b in zip(mine, ref))


def test_gathered_tensors_are_not_held_after_their_group(monkeypatch):
    """A gather that swaps full tensors into the parameter list for a group (as FSDP2's does): the update reads
    them, and no view of them is kept afterwards (they are freed with the group)."""
    import contextlib

    from difftrain.components import ema_gather

    @contextlib.contextmanager
    def swap(params, group):
        originals = {i: params[i] for i in group}
        for i in group:
            params[i] = params[i].detach().clone()  # the "full tensor" of a shard
        try:
            yield
        finally:
            for i, p in originals.items():
                params[i] = p

    def fake_iter_gathered(params, budget_bytes=0, modifier_rank=None):
        with swap(params, list(range(len(params)))):
            yield list(range(len(params)))

    model = torch.nn.Linear(5, 4)
    ema = ph.PostHocEMA(model, [0.05, 0.10], snapshot_every=10**9)
    monkeypatch.setattr(ema_gather, "iter_gathered", fake_iter_gathered)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model)
    ema.step(model)
    assert ema._param_views == {}
    assert torch.allclose(ema.shadows[1][0], model.weight)  # both steps saw the weights (step 1 copies)
