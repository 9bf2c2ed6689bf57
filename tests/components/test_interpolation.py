import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from difftrain.components.interpolation import (
    INTERPOLATION_MODES,
    PIL_ONLY_MODES,
    TENSOR_MODES,
    resize,
    resolve_interpolation_mode,
)

EXPECTED = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "nearest": InterpolationMode.NEAREST,
    "nearest_exact": InterpolationMode.NEAREST_EXACT,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


def _image_tensor(h=24, w=32):
    return (torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)


def test_mode_constants():
    assert INTERPOLATION_MODES == (
        "bilinear",
        "bicubic",
        "box",
        "nearest",
        "nearest_exact",
        "hamming",
        "lanczos",
    )
    assert PIL_ONLY_MODES == ("box", "hamming", "lanczos")
    assert set(TENSOR_MODES) | set(PIL_ONLY_MODES) == set(INTERPOLATION_MODES)


@pytest.mark.parametrize("name", INTERPOLATION_MODES)
def test_resolve_each_mode(name):
    assert resolve_interpolation_mode(name) is EXPECTED[name]


@pytest.mark.parametrize("name", ["BILINEAR", "nearest-exact", "area", "", None])
def test_resolve_rejects_other_names(name):
    with pytest.raises(ValueError, match="not supported"):
        resolve_interpolation_mode(name)


@pytest.mark.parametrize("name", INTERPOLATION_MODES)
def test_resize_pil_all_modes(name):
    image = TF.to_pil_image(_image_tensor())
    out = resize(image, (12, 16), name)
    assert isinstance(out, Image.Image)
    assert out.size == (16, 12)  # PIL size is (width, height)


@pytest.mark.parametrize("name", TENSOR_MODES)
def test_resize_tensor_modes(name):
    out = resize(_image_tensor().float(), (12, 16), name)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 12, 16)


def test_resize_batched_tensor_and_int_size_keeps_aspect_ratio():
    batch = torch.rand(2, 3, 24, 32)
    assert resize(batch, 12, "bicubic").shape == (2, 3, 12, 16)


@pytest.mark.parametrize("name", PIL_ONLY_MODES)
def test_resize_rejects_pil_only_mode_for_tensor(name):
    with pytest.raises(ValueError, match=f"{name}.*PIL images only"):
        resize(_image_tensor(), (12, 16), name)


def test_resize_accepts_interpolation_mode_enum():
    image = _image_tensor()
    assert torch.equal(
        resize(image, (12, 16), InterpolationMode.BILINEAR), resize(image, (12, 16), "bilinear")
    )
    with pytest.raises(ValueError):
        resize(image, (12, 16), InterpolationMode.LANCZOS)


def test_resize_rejects_unknown_mode_and_bad_type():
    with pytest.raises(ValueError):
        resize(_image_tensor(), 8, "area")
    with pytest.raises(TypeError):
        resize(_image_tensor(), 8, 3)


def test_resize_tensor_uses_antialias_and_agrees_with_pil():
    tensor = _image_tensor(64, 64)
    pil = TF.to_pil_image(tensor)
    ours = resize(tensor, (16, 16), "bilinear").float()
    from_pil = TF.pil_to_tensor(resize(pil, (16, 16), "bilinear")).float()
    aliased = TF.resize(tensor, [16, 16], interpolation=InterpolationMode.BILINEAR, antialias=False).float()
    assert (ours - from_pil).abs().mean() < 0.5  # measured 0.09 on the uint8 scale
    assert (aliased - from_pil).abs().mean() > 10  # measured 25 without antialiasing
    assert torch.equal(
        ours, TF.resize(tensor, [16, 16], interpolation=InterpolationMode.BILINEAR, antialias=True).float()
    )
