"""EMAModel: diffusers' tests/others/test_ema.py intent (with its vacuous asserts fixed) plus the fixes.

Upstream asserted `~torch.allclose(...)` (always truthy), compared a list with itself, and claimed decay=0
leaves the shadows unchanged. Here: `assert not torch.allclose`, snapshots with `.clone()`, and decay=0
means shadow == params exactly.
"""

import contextlib
import json
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel as UpstreamEMAModel

from difftrain.components import ema as ema_mod
from difftrain.components import ema_gather
from difftrain.components.ema import EMA_STATE_FILE, STATE_KEYS, EMAModel

FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def small_model(seed: int = 0, frozen: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)
    )
    if frozen:  # frozen tensors in the middle of the list: LoRA-like layout
        model[1].requires_grad_(False)
        model[2].weight.requires_grad_(False)
    return model


@torch.no_grad()
def simulate_backprop(params, generator: torch.Generator, scale: float = 0.1) -> None:
    """Change every trainable param (upstream: randn_like(p) + p * randn_like(p))."""
    for p in params:
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype))


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def all_close(a, b, **kw) -> bool:
    return all(torch.allclose(x.float(), y.float(), **kw) for x, y in zip(a, b, strict=True))


def all_equal(a, b) -> bool:
    return all(torch.equal(x.float(), y.float()) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- upstream test intent (fixed)
@FOREACH
def test_optimization_steps_updated(foreach):
    model = small_model()
    ema = EMAModel(model.parameters(), foreach=foreach)
    ema.step(model.parameters())
    assert ema.optimization_step == 1
    for _ in range(2):
        ema.step(model.parameters())
    assert ema.optimization_step == 3


@FOREACH
def test_shadow_params_not_updated(foreach):
    model = small_model()
    ema = EMAModel(model.parameters(), foreach=foreach)
    ema.step(model.parameters())
    assert all_equal(ema.shadow_params, model.parameters())
    for _ in range(4):
        ema.step(model.parameters())
    assert all_equal(ema.shadow_params, model.parameters())


@FOREACH
def test_shadow_params_updated(foreach):
    model, gen = small_model(), torch.Generator().manual_seed(0)
    ema = EMAModel(model.parameters(), foreach=foreach)
    initial = snapshot(ema.shadow_params)
    simulate_backprop(model.parameters(), gen)
    ema.step(model.parameters())  # first step: decay 0 -> exact copy of the live weights
    assert ema.cur_decay_value == 0.0
    assert all_equal(ema.shadow_params, model.parameters())
    trainable = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    assert not any(torch.allclose(initial[i], ema.shadow_params[i]) for i in trainable)
    simulate_backprop(model.parameters(), gen)
    for _ in range(4):
        ema.step(model.parameters())
    live = list(model.parameters())
    for i in trainable:  # now decay > 0: the shadow lags behind the live weights
        assert not torch.allclose(ema.shadow_params[i], live[i])


@FOREACH
def test_consecutive_shadow_params_updated(foreach):
    model, gen = small_model(), torch.Generator().manual_seed(0)
    ema = EMAModel(model.parameters(), foreach=foreach)
    simulate_backprop(model.parameters(), gen)
    ema.step(model.parameters())
    step_one = snapshot(ema.shadow_params)
    simulate_backprop(model.parameters(), gen)
    ema.step(model.parameters())
    step_two = snapshot(ema.shadow_params)
    for i, p in enumerate(model.parameters()):
        if p.requires_grad:
            assert not torch.allclose(step_one[i], step_two[i])
        else:  # frozen tensors are copied exactly, like upstream
            assert torch.equal(step_one[i], step_two[i])


@FOREACH
def test_zero_decay(foreach):
    model, gen = small_model(), torch.Generator().manual_seed(0)
    ema = EMAModel(model.parameters(), decay=0.0, foreach=foreach)
    previous = snapshot(ema.shadow_params)
    for _ in range(3):
        simulate_backprop(model.parameters(), gen)
        ema.step(model.parameters())
        assert ema.cur_decay_value == 0.0
        assert all_equal(ema.shadow_params, model.parameters())  # decay=0: shadow tracks params exactly
        assert not all_close(ema.shadow_params, previous)
        previous = snapshot(ema.shadow_params)


# ---------------------------------------------------------------- decay schedule anchors (reference note §1.1)
NO_WARMUP = [(1, 0.0), (2, 0.181818), (3, 0.25), (4, 0.307692), (5, 0.357143), (10, 0.526316), (100, 0.917431),
             (1000, 0.991080), (10_000, 0.999101), (100_000, 0.9999)]
WARMUP_2_3 = [(1, 0.0), (2, 0.370039), (3, 0.519250), (10, 0.784557), (100, 0.953584), (1000, 0.99),
              (31623, 0.999), (1_000_001, 0.9999)]
WARMUP_3_4 = [(1, 0.0), (2, 0.405396), (3, 0.561309), (10, 0.822172), (100, 0.968377), (1000, 0.994377),
              (10_001, 0.999), (215_444, 0.9999)]


@pytest.mark.parametrize(
    ("kwargs", "table"),
    [({}, NO_WARMUP), ({"use_ema_warmup": True}, WARMUP_2_3),
     ({"use_ema_warmup": True, "power": 3 / 4}, WARMUP_3_4)],
    ids=["no-warmup", "warmup-2/3", "warmup-3/4"],
)
def test_get_decay_anchors(kwargs, table):
    ema = EMAModel([torch.zeros(1)], **kwargs)
    upstream = UpstreamEMAModel([torch.zeros(1)], **kwargs)
    for step, expected in table:
        assert ema.get_decay(step) == pytest.approx(expected, abs=1e-6), step
        assert ema.get_decay(step) == upstream.get_decay(step)


def test_get_decay_update_after_step():
    ema = EMAModel([torch.zeros(1)], update_after_step=5)
    assert [ema.get_decay(s) for s in range(1, 7)] == [0.0] * 6
    assert ema.get_decay(7) == pytest.approx(2 / 11)
    clamped = EMAModel([torch.zeros(1)], decay=0.5, min_decay=0.3)
    assert clamped.get_decay(1) == 0.0  # k <= 0 bypasses min_decay, as upstream
    assert clamped.get_decay(2) == 0.3 and clamped.get_decay(10_000) == 0.5


# ---------------------------------------------------------------- equivalence with diffusers
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_ema_warmup": True, "power": 3 / 4, "update_after_step": 3}, {"decay": 0.9, "min_decay": 0.5}],
    ids=["default", "warmup", "clamped"],
)
def test_matches_diffusers(foreach, kwargs):
    ours_model, theirs_model = small_model(1), small_model(1)
    ours = EMAModel(ours_model.parameters(), foreach=foreach, **kwargs)
    theirs = UpstreamEMAModel(theirs_model.parameters(), foreach=foreach, **kwargs)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(30):
        simulate_backprop(ours_model.parameters(), g1)
        simulate_backprop(theirs_model.parameters(), g2)
        ours.step(ours_model.parameters())
        theirs.step(theirs_model.parameters())
        assert ours.optimization_step == theirs.optimization_step
        assert ours.cur_decay_value == theirs.cur_decay_value
    for s, t in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        torch.testing.assert_close(s, t, atol=1e-6, rtol=0)
    assert not all_close(ours.shadow_params, ours_model.parameters())  # the EMA really lags


@FOREACH
def test_step_allocates_no_model_sized_temporary(foreach):
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]
    ema = EMAModel(params, foreach=foreach)
    ema.step(params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ema.step(params)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert allocated == 0  # diffusers' foreach path allocates a copy of all params here


# ---------------------------------------------------------------- precision and hyper-parameter coercion
@FOREACH
def test_bf16_model_ema_moves_with_decay_09999(foreach, monkeypatch):
    monkeypatch.setattr(ema_mod, "CAST_CHUNK_BYTES", 600)  # several cast chunks on the foreach path
    model = small_model(2).to(torch.bfloat16)
    ema = EMAModel(model.parameters(), decay=0.9999, min_decay=0.9999, foreach=foreach)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    ema.step(model.parameters())  # decay 0: exact copy
    before = snapshot(ema.shadow_params)
    simulate_backprop(model.parameters(), torch.Generator().manual_seed(0), scale=1.0)
    ema.step(model.parameters())
    assert ema.cur_decay_value == pytest.approx(0.9999)
    for s, b, p in zip(ema.shadow_params, before, model.parameters(), strict=True):
        assert s.dtype == torch.float32
        expected = b + 1e-4 * (p.float() - b)
        torch.testing.assert_close(s, expected, atol=1e-7, rtol=1e-6)
        if p.requires_grad:
            assert not torch.equal(s, b)  # a bf16 shadow would round this update away


def test_int_hparams_from_yaml_round_trip(tmp_path):
    model = small_model()
    ema = EMAModel(model.parameters(), decay=1, min_decay=0, update_after_step=2.0, inv_gamma=1, power=1,
                   use_ema_warmup=0)
    assert isinstance(ema.min_decay, float) and isinstance(ema.decay, float)
    assert isinstance(ema.update_after_step, int) and ema.use_ema_warmup is False
    ema.step(model.parameters())
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    other = EMAModel(small_model(5).parameters())
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.hparams() == ema.hparams()
    assert all_equal(other.shadow_params, ema.shadow_params)
    other.load_state_dict({"min_decay": 0, "power": 1})  # upstream raises "Invalid min_decay" here
    assert other.min_decay == 0.0 and isinstance(other.min_decay, float)
    for bad in ({"min_decay": "0"}, {"decay": 1.5}, {"optimization_step": 1.5}, {"use_ema_warmup": 2}):
        with pytest.raises(ValueError, match="Invalid"):
            other.load_state_dict(bad)


def test_load_state_dict_keeps_buffers_and_validates():
    model = small_model()
    ema = EMAModel(model.parameters())
    buffers = [s.data_ptr() for s in ema.shadow_params]
    loaded = [torch.full_like(s, 2.0, dtype=torch.float64) for s in ema.shadow_params]
    ema.load_state_dict({"shadow_params": loaded, "optimization_step": 7})
    assert [s.data_ptr() for s in ema.shadow_params] == buffers  # copied in place, device/dtype kept
    assert all(s.dtype == torch.float32 and bool((s == 2).all()) for s in ema.shadow_params)
    assert ema.optimization_step == 7
    with pytest.raises(ValueError, match="shadow"):
        ema.load_state_dict({"shadow_params": loaded[:-1]})
    with pytest.raises(ValueError, match="must be a list"):
        ema.load_state_dict({"shadow_params": loaded[0]})


def test_to_keeps_float32_and_deprecated_kwargs():
    ema = EMAModel(small_model().parameters())
    with pytest.warns(UserWarning, match="float32"):
        ema.to(dtype=torch.bfloat16)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    with pytest.warns(FutureWarning):
        old = EMAModel(small_model().parameters(), max_value=0.5, min_value=0.1)
    assert (old.decay, old.min_decay) == (0.5, 0.1)
    with pytest.warns(FutureWarning):
        from_module = EMAModel(small_model())
    assert from_module.use_ema_warmup is True  # upstream's legacy side effect, kept


# ---------------------------------------------------------------- named / trainable-only (LoRA)
def test_named_trainable_only():
    model, gen = small_model(), torch.Generator().manual_seed(0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ema = EMAModel(model.named_parameters(), trainable_only=True, decay=0.9)
    assert ema.param_names == trainable and len(ema.shadow_params) == len(trainable)
    for how in (model.named_parameters, model.parameters, lambda: model):  # all three resolve
        simulate_backprop(model.parameters(), gen)
        ema.step(how())
    assert ema.optimization_step == 3
    named = ema.named_state_dict()
    assert list(named) == trainable and all(t.dtype == torch.float32 for t in named.values())
    live = dict(model.named_parameters())
    assert not any(torch.allclose(named[n], live[n]) for n in trainable)

    # round trip by name into an EMA built with another parameter order
    reordered = list(reversed(list(model.named_parameters())))
    other = EMAModel(reordered, trainable_only=True)
    assert other.param_names == list(reversed(trainable))
    assert other.load_named_state_dict(named) == ([], [])
    assert all(torch.equal(other.named_state_dict()[n], named[n]) for n in trainable)
    other.load_state_dict({**ema.state_dict()})  # positional format + param_names: matched by name
    assert all(torch.equal(other.named_state_dict()[n], named[n]) for n in trainable)
    with pytest.raises(KeyError):
        other.load_named_state_dict({**named, "extra.weight": torch.zeros(1)})
    missing, unexpected = other.load_named_state_dict({trainable[0]: named[trainable[0]]}, strict=False)
    assert unexpected == [] and sorted(missing) == sorted(trainable[1:])

    # copy_to / swapped touch only trainable params; frozen ones stay as they were
    with ema.swapped(model):
        cur = dict(model.named_parameters())
        assert all(torch.equal(cur[n], named[n]) for n in trainable)
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in frozen.items())
    with pytest.raises(ValueError, match="named_parameters"):
        EMAModel(model.parameters()).named_state_dict()


# ---------------------------------------------------------------- CPU offload
@FOREACH
def test_offload_equals_plain(foreach):
    model, gen = small_model(3), torch.Generator().manual_seed(0)
    plain = EMAModel(model.parameters(), foreach=foreach, use_ema_warmup=True)
    # a 100-byte staging chunk splits tensors across chunks and exercises the double buffering
    off = EMAModel(model.parameters(), foreach=foreach, use_ema_warmup=True, offload=True, offload_chunk_bytes=100)
    assert off.offload and all(s.device.type == "cpu" for s in off.shadow_params)
    flat = off._offload.flat
    assert all(s.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for s in off.shadow_params)
    assert flat.is_pinned() == torch.cuda.is_available()
    staging_ptrs = None
    for _ in range(6):
        simulate_backprop(model.parameters(), gen)
        plain.step(model.parameters())
        off.step(model.parameters())
        ptrs = [b.data_ptr() for b in off._offload.staging_buffers()]
        assert staging_ptrs in (None, ptrs)  # allocated once, reused
        staging_ptrs = ptrs
    torch.testing.assert_close(off.shadow_params, plain.shadow_params, atol=1e-7, rtol=0)
    assert off.cur_decay_value == plain.cur_decay_value

    late = EMAModel(model.parameters(), foreach=foreach)  # enable_offload() after construction
    late.load_state_dict(plain.state_dict())
    late.enable_offload(chunk_bytes=64)
    late.to("cpu")
    assert late.offload
    simulate_backprop(model.parameters(), gen)
    late.step(model.parameters())
    plain.step(model.parameters())
    torch.testing.assert_close(late.shadow_params, plain.shadow_params, atol=1e-7, rtol=0)
    late.pin_memory()  # no-op for an offloaded EMA, must not raise on a CPU-only machine


# ---------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def trained_unet_ema():
    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        simulate_backprop(unet.parameters(), gen, scale=0.05)
        ema.step(unet.parameters())
    return unet, ema


@FOREACH
def test_save_pretrained_round_trip(trained_unet_ema, tmp_path, foreach):
    unet, ema = trained_unet_ema
    assert not all_close(ema.shadow_params, unet.parameters())
    ema.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not set(STATE_KEYS) & set(config)  # no EMA hyper-parameters leak into the model config
    state = json.loads((tmp_path / EMA_STATE_FILE).read_text())
    assert {k: state[k] for k in STATE_KEYS} == ema.hparams()

    with_ema_weights = tiny_unet(9)
    ema.copy_to(with_ema_weights.parameters())
    loaded = UNet2DModel.from_pretrained(tmp_path)
    sample, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, t).sample, with_ema_weights(sample, t).sample, atol=1e-5, rtol=0)

    with _no_deprecation():  # no `config-passed-as-path` route
        restored = EMAModel.from_pretrained(tmp_path, model_cls=UNet2DModel, foreach=foreach)
    restored.to("cpu")
    assert restored.hparams() == ema.hparams() and restored.foreach is foreach
    assert all_close(restored.shadow_params, ema.shadow_params, atol=1e-6)


def test_from_pretrained_reads_a_diffusers_folder(trained_unet_ema, tmp_path):
    unet, _ = trained_unet_ema
    upstream = UpstreamEMAModel(unet.parameters(), decay=0.99, model_cls=UNet2DModel, model_config=unet.config)
    upstream.step(unet.parameters())
    upstream.step(unet.parameters())
    upstream.save_pretrained(tmp_path)  # EMA keys end up in config.json
    ema = EMAModel.from_pretrained(tmp_path, model_cls=UNet2DModel)
    assert (ema.decay, ema.optimization_step) == (0.99, 2)
    assert all_close(ema.shadow_params, upstream.shadow_params, atol=1e-6)


def test_save_pretrained_needs_full_coverage(tmp_path):
    unet = tiny_unet()
    unet.conv_in.requires_grad_(False)
    ema = EMAModel(unet.named_parameters(), trainable_only=True, model_cls=UNet2DModel, model_config=unet.config)
    with pytest.raises(ValueError, match="covers"):
        ema.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(unet.parameters()).save_pretrained(tmp_path)


@contextlib.contextmanager
def _no_deprecation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "config" in m and "deprecat" in m.lower()], messages


# ---------------------------------------------------------------- store / restore / swapped
@FOREACH
def test_store_restore_bit_identical(foreach):
    model, gen = small_model(), torch.Generator().manual_seed(0)
    ema = EMAModel(model.parameters(), foreach=foreach)
    simulate_backprop(model.parameters(), gen)
    ema.step(model.parameters())
    simulate_backprop(model.parameters(), gen)
    live = snapshot(model.parameters())
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert all_equal(model.parameters(), ema.shadow_params)
    assert not all_close(model.parameters(), live)
    ema.restore(model.parameters())
    assert all_equal(model.parameters(), live)
    assert ema.temp_stored_params is None
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ema.restore(model.parameters())


def test_swapped_restores_on_exception():
    model, gen = small_model(), torch.Generator().manual_seed(0)
    ema = EMAModel(model.parameters())
    simulate_backprop(model.parameters(), gen)
    live = snapshot(model.parameters())
    with ema.swapped(model.parameters()):
        assert all_equal(model.parameters(), ema.shadow_params)
    assert all_equal(model.parameters(), live)
    with pytest.raises(ZeroDivisionError), ema.swapped(model.parameters()):
        assert all_equal(model.parameters(), ema.shadow_params)
        _ = 1 / 0
    assert all_equal(model.parameters(), live)
    assert ema.temp_stored_params is None


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 (faked)
def fake_zero3(params):
    """Tag params like DeepSpeed ZeRO-3 partitions (data stays real so results can be compared)."""
    for i, p in enumerate(params):
        p.ds_id, p.ds_numel, p.ds_shape = i, p.numel(), p.shape
    return params


def test_bucket_by_bytes():
    params = [torch.zeros(n) for n in (10, 10, 30, 5, 100, 1, 1)]  # fp32: 40, 40, 120, 20, 400, 4, 4 bytes
    groups = ema_gather.bucket_by_bytes(params, budget_bytes=100)
    assert groups == [[0, 1], [2], [3], [4], [5, 6]]
    assert [i for g in groups for i in g] == list(range(len(params)))
    partition = torch.zeros(0)
    partition.ds_numel = 50  # a partitioned param: numel 0 locally, 200 bytes gathered
    assert ema_gather.full_nbytes(partition) == 200
    assert ema_gather.bucket_by_bytes([partition, torch.zeros(1)], 200) == [[0], [1]]
    with pytest.raises(ValueError):
        ema_gather.bucket_by_bytes(params, 0)


def test_zero3_gathers_in_bounded_groups(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def fake_gather(params, modifier_rank):
        calls.append((len(params), sum(ema_gather.full_nbytes(p) for p in params), modifier_rank))
        yield

    monkeypatch.setattr(ema_gather, "gathered_parameters", fake_gather)
    model, ref_model = small_model(4), small_model(4)
    fake_zero3(list(model.parameters()))
    budget = 300
    ema = EMAModel(model.parameters(), foreach=True, gather_bucket_bytes=budget)
    ref = EMAModel(ref_model.parameters(), foreach=True)
    n_params = len(list(model.parameters()))
    assert calls and all(rank is None for _, _, rank in calls)
    assert sum(n for n, _, _ in calls) == n_params  # every param gathered once at construction
    assert all(nbytes <= budget or n == 1 for n, nbytes, _ in calls)

    calls.clear()
    gen1, gen2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    simulate_backprop(model.parameters(), gen1)
    simulate_backprop(ref_model.parameters(), gen2)
    ema.step(model.parameters())
    ref.step(ref_model.parameters())
    assert len(calls) > 1 and all(rank is None for _, _, rank in calls)  # read-only gather
    assert all_equal(ema.shadow_params, ref.shadow_params)

    calls.clear()
    ema.copy_to(model.parameters())
    assert calls and all(rank == 0 for _, _, rank in calls)  # writes need modifier_rank=0
    calls.clear()
    ema.store(model.parameters())
    assert calls and all(rank is None for _, _, rank in calls)
    calls.clear()
    ema.restore(model.parameters())
    assert calls and all(rank == 0 for _, _, rank in calls)


def test_no_zero3_no_gather(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("gathered without ZeRO-3 params")

    monkeypatch.setattr(ema_gather, "gathered_parameters", boom)
    model = small_model()
    ema = EMAModel(model.parameters(), foreach=True, gather_bucket_bytes=8)
    ema.step(model.parameters())
    ema.copy_to(model.parameters())


def test_import_does_not_import_deepspeed():
    code = "import sys, difftrain.components.ema; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
