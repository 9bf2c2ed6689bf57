"""What a run does with its model besides training: validation (sample grid + validation loss, raw and
EMA weights), the digits-classifier evaluation and the export of `final/`. One object with explicit
inputs; the model it is handed is the strategy's `eval_copy()` (rank 0 only).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from difftrain.families.protocol import SampleRequest


def save_grid(images: torch.Tensor, path: Path, nrow: int, upscale: int = 1) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (nearest-upscaled for tiny images)."""
    from torchvision.utils import save_image

    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


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


def digits_accuracy(generate, num_classes: int, samples_per_label: int, steps: int, seed: int) -> dict:
    """Accuracy of the digits classifier on class-conditional samples (one number per label too).
    `generate(request) -> (images, nrow)` is a family's generation (training) or a finished run's (CLI)."""
    request = SampleRequest(labels=tuple(range(num_classes)), per_condition=samples_per_label, steps=steps,
                            seed=seed)
    images, _ = generate(request)
    labels = torch.arange(num_classes).repeat_interleave(samples_per_label)
    correct = (DigitsClassifier().predict(images) == labels).float()
    per_label = correct.view(num_classes, samples_per_label).mean(dim=1)
    return {"accuracy": correct.mean().item(), "per_label": [round(v, 4) for v in per_label.tolist()],
            "samples": len(labels), "inference_steps": steps}


def _ema_weights(model, ema):
    """The EMA weights inside (the live ones restored after, always); without EMA, the live weights."""
    return ema.swapped(model) if ema is not None else nullcontext()


class Evaluator:
    """Validation, evaluation and export of one run (rank 0).

    `validation` and `evaluation` are the config sections of the same names; `digits_classes` is the number of
    digit classes when the data is the digits set (the classifier only knows those), else None."""

    def __init__(self, family, objective, data, validation: dict, evaluation: dict, run_dir: Path, device,
                 digits_classes: int | None) -> None:
        self.family, self.objective, self.data = family, objective, data
        self.validation, self.evaluation = validation, evaluation
        self.run_dir, self.device, self.digits_classes = run_dir, device, digits_classes
        self._fixed_inputs = None

    def _loss_inputs(self):
        """The fixed samples of the validation loss (data.validation_batch: held-out ones when the data holds
        some out, at the most common bucket size, unaugmented), as posterior means; computed once."""
        if self._fixed_inputs is None:
            batch = self.data.validation_batch(self.validation["loss_batch_size"])
            self._fixed_inputs = self.family.inputs(batch, self.device)
        return self._fixed_inputs

    def validate(self, model, ema, step: int, metrics) -> None:
        """Validation loss (raw and EMA weights) and a sample grid with the EMA weights (always restored)."""
        was_training = model.training
        model.eval()
        x0, cond = self._loss_inputs()
        timesteps, seed = self.validation["loss_timesteps"], self.validation["seed"]
        values = {"val_loss": self.objective.validation_loss(self.family, model, x0, cond, timesteps, seed)}
        with _ema_weights(model, ema):
            if ema is not None:
                values["val_loss_ema"] = self.objective.validation_loss(self.family, model, x0, cond, timesteps, seed)
            request = self.family.validation_request(self.validation, self.data)
            images, nrow = self.family.generate(model, self.objective.schedule, request, self.device)
        path = save_grid(images, self.run_dir / "samples" / f"step_{step:06d}.png", nrow=nrow,
                         upscale=max(1, 64 // images.shape[-1]))
        model.train(was_training)
        metrics.log(step, values)
        metrics.image("samples", path, step)

    def evaluate(self, model, ema) -> dict | None:
        """Digits-classifier accuracy with the EMA weights (digits data only), else None."""
        if not self.evaluation["enabled"] or not self.digits_classes:
            return None
        model.eval()
        e = self.evaluation

        def generate(request):
            return self.family.generate(model, self.objective.schedule, request, self.device)

        with _ema_weights(model, ema):
            return digits_accuracy(generate, self.digits_classes, e["samples_per_label"], e["inference_steps"],
                                   e["seed"])

    def export(self, model, ema) -> Path:
        """final/ in the family's diffusers formats; then export.lora_formats, the model card and, with
        hub.push_on_finish, the upload (engine/model_card.py, from the run's config.yaml)."""
        from difftrain.engine.model_card import finish_export

        final = self.run_dir / "final"
        self.family.export(final, model, ema, self.objective.schedule)
        finish_export(self.run_dir)
        return final
