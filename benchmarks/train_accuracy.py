"""`sbcrt train` accuracy on photos of species the head never saw, and on a task the base model knows nothing of.

Task "animals": the 250 shared ImageNet photos (one per fourth class) grouped by class index into dog (151-268),
bird (7-24, 80-100, 127-146), other animal (the rest of 0-397) and no animal (398-999). Every other photo of each
group trains, the rest test: each photo is its own ImageNet class, so every test photo is of a species the head
never saw. Task "upside-down": the training half upright and turned 180 degrees, tested on the other half; the
ImageNet classes say nothing about it, so the head has to come from the features.

For each task, each head kind (--head features, prior, features+prior) and the one cross-validation chooses
(auto) are trained with the real `train()` on the base model and the written .onnx file is scored with
`Classifier` on the test photos (what `sbcrt classify` and `watch` would answer). Prints a table and writes JSON.

    .venv/bin/python benchmarks/train_accuracy.py --model build/lite0.onnx [--json build/train_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbcrt.runtime.classifier import Classifier  # noqa: E402
from sbcrt.train.trainer import TrainSettings, train  # noqa: E402
from tests.support.data import shared_dir  # noqa: E402

SHARED = shared_dir() / "data"  # $SBCRT_SHARED, else ../shared
GROUPS = {"dog": [(151, 268)], "bird": [(7, 24), (80, 100), (127, 146)], "other_animal": [(0, 397)]}


def animal_group(index: int) -> str:
    for name in ("dog", "bird", "other_animal"):
        if any(lo <= index <= hi for lo, hi in GROUPS[name]):
            return name
    return "no_animal"


def shared_photos(shared: Path) -> list[tuple[Path, int]]:
    synsets = [line.split()[0] for line in (shared / "imagenet_classes.txt").read_text().splitlines() if line.strip()]
    index = {s: i for i, s in enumerate(synsets)}
    return [(p, index[p.name.split("_", 1)[0]]) for p in sorted((shared / "imagenet-samples").glob("*.JPEG"))]


def split_animals(photos: list[tuple[Path, int]]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Alternate photos of each group (sorted by class index) into train and test."""
    train_set, test_set, seen = [], [], {}
    for path, index in photos:
        group = animal_group(index)
        seen[group] = seen.get(group, 0) + 1
        (train_set if seen[group] % 2 else test_set).append((path, group))
    return train_set, test_set


def link_folders(root: Path, items: list[tuple[Path, str]]) -> Path:
    for path, label in items:
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / path.name).symlink_to(path)
    return root


def turned_folders(root: Path, photos: list[Path]) -> list[tuple[Path, str]]:
    """Each photo upright and turned 180 degrees, both re-encoded the same way (so only the turn differs)."""
    items = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        for label, picture in (("upright", image), ("upside_down", image.rotate(180))):
            out = root / label / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            picture.save(out, quality=92)
            items.append((out, label))
    return items


def score(model: Path, items: list[tuple[Path, str]]) -> dict:
    classifier = Classifier(model, cache_dir=False)
    labels = classifier.labels
    truth = np.array([labels.index(label) for _, label in items])
    predicted = np.array([classifier.classify(path).top1.index for path, _ in items])
    recall = [float((predicted[truth == k] == k).mean()) for k in range(len(labels)) if (truth == k).any()]
    return {"accuracy": float((predicted == truth).mean()), "balanced_accuracy": float(np.mean(recall))}


def run_task(name: str, data: Path, test: list[tuple[Path, str]], base: Path, work: Path, cache: Path) -> list[dict]:
    rows = []
    for head in ("features", "prior", "features+prior", "auto"):
        output = work / f"{name}-{head}.onnx"
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        started = time.perf_counter()
        report = train(TrainSettings(data, base, output, head=head, cache_dir=cache))
        wall = time.perf_counter() - started
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu
        held_out = score(output, test)
        rows.append(
            {
                "task": name,
                "head_requested": head,
                "head": report.head_kind,
                "settings": report.chosen.describe(),
                "train_photos": sum(report.photos.values()),
                "test_photos": len(test),
                "cv_accuracy": report.accuracy,
                "cv_balanced_accuracy": report.balanced_accuracy,
                "test_accuracy": held_out["accuracy"],
                "test_balanced_accuracy": held_out["balanced_accuracy"],
                "features_s": report.timings_s["features"],
                "fit_s": report.timings_s["fit"],
                "total_s": wall,
                "cpu_s": cpu,
                "cached_photos": report.cached_photos,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "build" / "lite0.onnx", help="base .onnx model")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder with imagenet-samples/")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "train_accuracy.json", help="JSON output")
    args = parser.parse_args()

    photos = shared_photos(args.shared)
    train_items, test_items = split_animals(photos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"  # empty: the first run measures feature extraction, the second reads the cache
        data = link_folders(work / "animals", train_items)
        rows += run_task("animals", data, test_items, args.model, work, cache)
        turned_train = turned_folders(work / "turned-train", [p for p, _ in train_items])
        turned_test = turned_folders(work / "turned-test", [p for p, _ in test_items])
        del turned_train
        rows += run_task("upside-down", work / "turned-train", turned_test, args.model, work, cache)

    header = f"{'task':<12} {'head':<21} {'train':>5} {'test':>5} {'CV acc':>7} {'test acc':>8} "
    header += f"{'test bal':>8} {'features s':>10} {'fit s':>6} {'cpu s':>6}  settings"
    print(header)
    for r in rows:
        head = r["head"] if r["head_requested"] != "auto" else f"auto: {r['head']}"
        print(
            f"{r['task']:<12} {head:<21} {r['train_photos']:>5} {r['test_photos']:>5} "
            f"{r['cv_accuracy']:>7.3f} {r['test_accuracy']:>8.3f} {r['test_balanced_accuracy']:>8.3f} "
            f"{r['features_s']:>10.1f} {r['fit_s']:>6.1f} {r['cpu_s']:>6.1f}  {r['settings']}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
