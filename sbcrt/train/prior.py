"""The "prior" head: what the base model already recognises, mapped to the user's labels.

A photo's base posterior p(c|x) over the base model's classes (softmax of its logits / T) is mapped to the user's
labels by R[c, label] = P(label | base class c), learned from the training photos: which base classes the photos of
each label land in (M0[c, label], the mean posterior of the label's photos). Photos of a species never seen in
training land in base classes no training photo landed in, so M0 alone knows nothing of them. M0 is therefore
smoothed over the geometry of the base model's own classifier: base classes whose classifier rows point the same
way (cosine) are treated alike, by label propagation on their k-nearest-neighbour graph (Zhou et al., "Learning with
local and global consistency", 2004): M = (1 - a) (I - a Wn)^-1 M0, Wn the symmetrically normalised graph. Dog
breeds' rows cluster, birds' cluster, so an unseen breed inherits "dog" from the breeds that were seen.

k, a and T are chosen by cross-validation on the training photos (trainer.py); nothing here knows the test photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Floor of P(label | c) before the rows are normalised: every label keeps a little mass everywhere, so the log
# of the mapped probabilities stays finite for a photo unlike any training photo.
MAPPING_FLOOR = 1e-6


@dataclass(frozen=True)
class PriorSetting:
    neighbours: int  # k of the k-nearest-neighbour graph over the base classifier's rows
    alpha: float  # propagation strength (0: no smoothing)
    temperature: float  # T of softmax(base logits / T)


class ClassGraph:
    """The base classes' k-NN graph (cosine of classifier rows), eigendecomposed once per k, so propagation for
    any strength a is two matrix products: (1 - a) (I - a Wn)^-1 = V diag((1 - a) / (1 - a l)) V^T."""

    def __init__(self, classifier_rows: np.ndarray) -> None:
        unit = classifier_rows / np.maximum(np.linalg.norm(classifier_rows, axis=1, keepdims=True), 1e-12)
        cosine = unit @ unit.T
        np.fill_diagonal(cosine, -np.inf)
        self._order = np.argsort(-cosine, axis=1)
        self._cosine = cosine
        self._eigen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def classes(self) -> int:
        return self._cosine.shape[0]

    def _decomposed(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._eigen:
            n = self.classes
            k = min(k, n - 1)
            rows = np.arange(n)[:, None]
            neighbours = self._order[:, :k]
            weights = np.zeros((n, n))
            weights[rows, neighbours] = np.exp(self._cosine[rows, neighbours])
            weights = np.maximum(weights, weights.T)  # symmetric: a neighbour of a neighbour's list counts
            inv_sqrt = 1.0 / np.sqrt(weights.sum(axis=1) + 1e-12)
            self._eigen[k] = np.linalg.eigh(weights * inv_sqrt[:, None] * inv_sqrt[None, :])
        return self._eigen[k]

    def propagate(self, seeds: np.ndarray, k: int, alpha: float) -> np.ndarray:
        """(1 - a) (I - a Wn)^-1 @ seeds, seeds: (classes, m)."""
        if alpha == 0:
            return seeds
        eigenvalues, vectors = self._decomposed(k)
        gain = (1 - alpha) / (1 - alpha * eigenvalues)
        return vectors @ (gain[:, None] * (vectors.T @ seeds))


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def mapping(propagated: np.ndarray, y: np.ndarray, rows: np.ndarray, classes: int) -> np.ndarray:
    """R[c, label] = P(label | c) from the propagated posteriors of the training photos `rows`.

    propagated: (base classes, photos), each photo's propagated posterior (its views averaged). Each label's
    column is the mean over its photos, so a label with many photos does not swallow the others."""
    seeds = np.zeros((propagated.shape[0], classes))
    for label in range(classes):
        members = rows[y[rows] == label]
        if len(members):
            seeds[:, label] = propagated[:, members].mean(axis=1)
    seeds = np.maximum(seeds, 0.0) + MAPPING_FLOOR * max(float(seeds.max()), 1e-30)
    return seeds / seeds.sum(axis=1, keepdims=True)
