"""The training report a person reads: counts, cross-validated figures, the confusion matrix (text and PNG)."""

from __future__ import annotations

from pathlib import Path

from sbcrt.errors import SbcrtError
from sbcrt.train.trainer import TrainReport

CELL = 56  # PNG cell size in pixels


def render(report: TrainReport, *, notes: bool = True) -> str:
    labels = report.labels
    width = max(len(label) for label in labels)
    used = sum(report.photos.values())
    lines = [f"trained {report.output} on {used} photos in {len(labels)} classes (base {report.base['path']}, "
             f"{report.base['architecture']})"]  # fmt: skip
    for label in labels:
        lines.append(f"  {label:<{width}}  {report.photos[label]:>5} photos")
    if report.failures:
        lines.append(f"  {len(report.failures)} photos could not be read (listed on stderr) and were left out")
    lines.append(
        f"head: {report.head_kind}, {report.chosen.describe() if report.chosen else ''} (chosen by "
        f"{report.folds}-fold cross-validation among {len(report.candidates)} candidates, lowest log loss)"
    )
    lines.append(
        f"cross-validated accuracy {report.accuracy:.3f}, balanced (mean recall) {report.balanced_accuracy:.3f}"
    )
    lines.append(f"  {'class':<{width}}  precision  recall")
    for label, precision, recall in zip(labels, report.precision, report.recall, strict=True):
        lines.append(f"  {label:<{width}}  {precision:9.3f}  {recall:6.3f}")
    lines.append("confusion matrix (rows: true class, columns: predicted, cross-validated):")
    column = max(5, max(len(str(v)) for row in report.confusion for v in row) + 1)
    short = [label[: column - 1] for label in labels]
    lines.append("  " + " " * width + "".join(f"{s:>{column}}" for s in short))
    for label, row in zip(labels, report.confusion, strict=True):
        lines.append(f"  {label:<{width}}" + "".join(f"{v:>{column}}" for v in row))
    t = report.timings_s
    lines.append(
        f"time: features {t.get('features', 0):.1f} s ({report.cached_photos} photos from the cache), "
        f"fit {t.get('fit', 0):.1f} s, total {t.get('total', 0):.1f} s"
    )
    if notes:
        lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def draw_confusion_png(report: TrainReport, path: Path) -> None:
    """The confusion matrix as a PNG (Pillow, already a runtime dependency): darker cells hold more photos."""
    from PIL import Image, ImageDraw

    labels, matrix = report.labels, report.confusion
    n = len(labels)
    margin = 8 + 7 * max(len(label) for label in labels)
    image = Image.new("RGB", (margin + n * CELL + 8, 24 + margin + n * CELL + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), "rows: true class, columns: predicted", fill="black")
    for i, row in enumerate(matrix):
        total = max(1, sum(row))
        draw.text((4, 24 + margin + i * CELL + CELL // 2 - 5), labels[i], fill="black")
        for j, value in enumerate(row):
            shade = int(255 - 200 * value / total)
            x0, y0 = margin + j * CELL, 24 + margin + i * CELL
            fill = (shade, shade, 255) if i == j else (255, shade, shade)
            draw.rectangle((x0, y0, x0 + CELL - 2, y0 + CELL - 2), fill=fill, outline="grey")
            draw.text((x0 + CELL // 2 - 8, y0 + CELL // 2 - 5), str(value), fill="black")
    for j, label in enumerate(labels):
        draw.text((margin + j * CELL + 2, 24 + margin - 14), label[: CELL // 7], fill="black")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except OSError as exc:
        raise SbcrtError(f"cannot write {path}: {exc.strerror or exc}") from None
