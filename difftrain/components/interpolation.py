"""Image interpolation modes.

`resolve_interpolation_mode` maps the same seven names to `torchvision.transforms.InterpolationMode` as
`diffusers.training_utils.resolve_interpolation_mode`, with the same errors. `resize` adds what upstream leaves
to the caller: ``box``, ``hamming`` and ``lanczos`` exist only for PIL images (torchvision's tensor resize
does not implement them), so `resize` rejects them for tensors with a clear ValueError instead of a backend error,
and it always passes ``antialias=True`` so that tensor and PIL resizes agree (torchvision's tensor default once
was no antialiasing).
"""

from __future__ import annotations

import torch

__all__ = ["INTERPOLATION_MODES", "PIL_ONLY_MODES", "TENSOR_MODES", "resize", "resolve_interpolation_mode"]

#: The names `resolve_interpolation_mode` accepts, in upstream's order.
INTERPOLATION_MODES = ("bilinear", "bicubic", "box", "nearest", "nearest_exact", "hamming", "lanczos")
#: Modes that torchvision implements for PIL images only.
PIL_ONLY_MODES = ("box", "hamming", "lanczos")
#: Modes that work on both PIL images and tensors.
TENSOR_MODES = tuple(m for m in INTERPOLATION_MODES if m not in PIL_ONLY_MODES)


def _transforms():
    try:
        from torchvision import transforms
    except ImportError:
        raise ImportError(
            "Please make sure to install `torchvision` to be able to use the `resolve_interpolation_mode()` function."
        ) from None
    return transforms


def resolve_interpolation_mode(interpolation_type: str):
    """Return the `torchvision.transforms.InterpolationMode` for one of `INTERPOLATION_MODES`.

    Raises ValueError for any other name (same message as diffusers) and ImportError without torchvision.
    """
    transforms = _transforms()
    if interpolation_type not in INTERPOLATION_MODES:
        raise ValueError(
            f"The given interpolation mode {interpolation_type} is not supported. Currently supported interpolation"
            f" modes are `bilinear`, `bicubic`, `box`, `nearest`, `nearest_exact`, `hamming`, and `lanczos`."
        )
    return transforms.InterpolationMode[interpolation_type.upper()]


def _mode_name(mode) -> str:
    if isinstance(mode, str):
        resolve_interpolation_mode(mode)  # validates the name
        return mode
    transforms = _transforms()
    if isinstance(mode, transforms.InterpolationMode):
        return mode.name.lower()
    raise TypeError(f"mode must be a mode name or an InterpolationMode, got {type(mode).__name__}")


def resize(image, size, mode="bilinear"):
    """Resize a PIL image or an image tensor (``[..., H, W]``) with ``antialias=True``.

    Args:
        image: ``PIL.Image.Image`` (every mode) or ``torch.Tensor`` (``bilinear``, ``bicubic``, ``nearest``,
            ``nearest_exact``).
        size: As in ``torchvision.transforms.functional.resize``: an int (the smaller edge, aspect ratio kept)
            or ``(height, width)``.
        mode: A name from `INTERPOLATION_MODES` or a torchvision ``InterpolationMode``.

    Raises:
        ValueError: unknown mode, or a PIL-only mode (box, hamming, lanczos) with a tensor.
    """
    from torchvision.transforms import functional as TF

    name = _mode_name(mode)
    if isinstance(image, torch.Tensor) and name in PIL_ONLY_MODES:
        raise ValueError(
            f"Interpolation mode {name!r} works on PIL images only; for tensors use one of "
            f"{', '.join(TENSOR_MODES)} (or convert the tensor to a PIL image first)."
        )
    if isinstance(size, int):
        size = [size]
    return TF.resize(image, list(size), interpolation=resolve_interpolation_mode(name), antialias=True)


def build_interpolation(options):
    """Registry target of the `interpolation` group: the torchvision mode of the chosen option."""
    return resolve_interpolation_mode(options.name)
