"""Sampling, sample grids, the fixed validation loss, and the digits-classifier evaluation."""

from __future__ import annotations

from pathlib import Path

import torch


def inference_scheduler(schedule, steps: int):
    """DDIM for DDPM-family training schedules, flow-matching Euler for SD3-style ones."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = dict(schedule.scheduler.config)
    if schedule.prediction_type == "flow":
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        config["prediction_type"] = schedule.prediction_type
        sched = DDIMScheduler.from_config(config, set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(predict, schedule, shape: tuple[int, ...], steps: int, seed: int, device) -> torch.Tensor:
    """Generate images in [-1, 1] of `shape` (N, C, H, W); `predict(x_t, timesteps)` runs the model."""
    sched = inference_scheduler(schedule, steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device) * float(getattr(sched, "init_noise_sigma", 1.0))
    scale = getattr(sched, "scale_model_input", lambda sample, t: sample)  # flow matching has none
    for t in sched.timesteps:
        timesteps = t.to(device).expand(shape[0])
        pred = predict(scale(x, t), timesteps)
        x = sched.step(pred.float(), t, x, return_dict=False)[0]
    return x.clamp(-1, 1).float().cpu()


def save_grid(images: torch.Tensor, path: Path, nrow: int, upscale: int = 1) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (nearest-upscaled for tiny images)."""
    from torchvision.utils import save_image

    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


@torch.no_grad()
def validation_loss(bundle, model, schedule, dataset, num_timesteps: int, batch_size: int, seed: int,
                    device) -> float:
    """Unweighted MSE at fixed, evenly spaced timesteps on fixed samples and fixed noise."""
    n = min(batch_size, len(dataset))
    x0, cond = bundle.inputs(dataset.batch(torch.arange(n)), device)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    grid = torch.linspace(0, schedule.num_train_timesteps - 1, num_timesteps).round().long()
    for index in grid:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        idx = index.expand(n).to(device)
        noisy = schedule.add_noise(x0, noise, idx)
        pred = bundle.predict(model, noisy, schedule.model_timesteps(idx), cond).float()
        total += torch.mean((pred - schedule.target(x0, noise, idx)) ** 2).item()
    return total / num_timesteps


class DigitsClassifier:
    """Logistic regression on the 8x8 UCI digits (fit on the dataset; ~97% held-out accuracy)."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        digits = load_digits()
        self.model = LogisticRegression(max_iter=2000, C=0.5).fit(digits.data / 16.0, digits.target)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, H, W) in [-1, 1] -> predicted labels (resized to 8x8 if needed)."""
        if images.shape[-1] != 8:
            images = torch.nn.functional.interpolate(images, size=(8, 8), mode="area")
        features = ((images.clamp(-1, 1) + 1) / 2).reshape(len(images), -1).numpy()
        return torch.from_numpy(self.model.predict(features))


def evaluate_digits(model, schedule, samples_per_label: int, steps: int, seed: int, device,
                    resolution: int, num_classes: int = 10) -> dict:
    """Accuracy of the digits classifier on class-conditional samples (one number per label too)."""
    labels = torch.arange(num_classes).repeat_interleave(samples_per_label)
    on_device = labels.to(device)

    def predict(x, t):
        return model(x, t, class_labels=on_device, return_dict=False)[0]

    images = sample(predict, schedule, (len(labels), 1, resolution, resolution), steps, seed, device)
    predicted = DigitsClassifier().predict(images)
    correct = (predicted == labels).float()
    per_label = correct.view(num_classes, samples_per_label).mean(dim=1)
    return {"accuracy": correct.mean().item(), "per_label": [round(v, 4) for v in per_label.tolist()],
            "samples": len(labels), "inference_steps": steps}
