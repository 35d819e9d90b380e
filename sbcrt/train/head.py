"""A small softmax-regression head in numpy: class-balanced, L2-regularised, fitted with L-BFGS.

A few hundred photos give a convex problem of a few thousand weights; L-BFGS solves it in a few hundred cheap
matrix products, so no scikit-learn (whose Pi wheels are large and whose pins would join the runtime's) is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LBFGS_MEMORY = 10
MAX_ITERATIONS = 400
GRADIENT_TOLERANCE = 1e-5


@dataclass
class LinearHead:
    """scores = x @ weight.T + bias (weight: classes x inputs), inputs already standardised by the caller."""

    weight: np.ndarray
    bias: np.ndarray
    iterations: int = 0

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def balanced_weights(labels: np.ndarray, groups: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row weights: every class weighs the same in total, and a photo's augmented views share its weight."""
    views = np.bincount(groups)[groups].astype(np.float64)
    photos_per_class = np.bincount(labels[_first_rows(groups)], minlength=num_classes).astype(np.float64)
    return 1.0 / (views * num_classes * photos_per_class[labels])


def _first_rows(groups: np.ndarray) -> np.ndarray:
    _, first = np.unique(groups, return_index=True)
    return first


def _loss_and_gradient(
    params: np.ndarray, x: np.ndarray, onehot: np.ndarray, weights: np.ndarray, l2: float
) -> tuple[float, np.ndarray]:
    classes, inputs = onehot.shape[1], x.shape[1]
    w = params[: classes * inputs].reshape(classes, inputs)
    b = params[classes * inputs :]
    scores = x @ w.T + b
    scores -= scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scores).sum(axis=1, keepdims=True))
    log_probs = scores - log_norm
    loss = -float((weights[:, None] * onehot * log_probs).sum()) + 0.5 * l2 * float((w * w).sum())
    residual = (np.exp(log_probs) - onehot) * weights[:, None]
    grad_w = residual.T @ x + l2 * w
    grad_b = residual.sum(axis=0)
    return loss, np.concatenate([grad_w.ravel(), grad_b])


def fit_head(
    x: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    l2: float,
    sample_weights: np.ndarray,
    start: LinearHead | None = None,
) -> LinearHead:
    """Minimise the weighted cross-entropy + l2/2 |W|^2 (the bias is not penalised); `sample_weights` sum to 1.

    `start` warm-starts the solver (a neighbouring regularisation's solution converges in far fewer steps).

    With fewer rows than inputs (a few hundred photos, 1280+ features) the problem is solved in the rows'
    span: x = U S Vt (U, S from x x^T's eigenvectors), and the L2-optimal weights are W = B Vt, with the same
    loss and the same |W| = |B| in terms of the r <= rows columns of U S. Exact, and each step then costs
    rows x r instead of rows x inputs."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] > x.shape[0]:
        # From the rows' Gram matrix: an eigendecomposition of rows x rows, ~50x cheaper than numpy's SVD here.
        eigenvalues, u = np.linalg.eigh(x @ x.T)
        keep = eigenvalues > max(float(eigenvalues.max()), 1e-300) * 1e-10
        u, s = u[:, keep], np.sqrt(eigenvalues[keep])
        vt = (u / s).T @ x
        reduced_start = None if start is None else LinearHead(start.weight @ vt.T, start.bias)
        small = fit_head(u * s, labels, num_classes, l2=l2, sample_weights=sample_weights, start=reduced_start)
        return LinearHead(weight=small.weight @ vt, bias=small.bias, iterations=small.iterations)
    onehot = np.eye(num_classes)[labels]
    size = num_classes * x.shape[1]
    params = (
        np.concatenate([start.weight.ravel(), start.bias]).astype(np.float64)
        if start is not None
        else np.zeros(size + num_classes)
    )
    loss, grad = _loss_and_gradient(params, x, onehot, sample_weights, l2)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007 (the count is reported)
        if np.abs(grad).max() < GRADIENT_TOLERANCE:
            break
        direction = _two_loop(grad, steps)
        slope = float(grad @ direction)
        if slope >= 0:  # curvature pairs went stale: restart from steepest descent
            steps.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0 if steps else min(1.0, 1.0 / max(np.abs(grad).sum(), 1e-12))
        while True:  # backtracking (Armijo): the loss is smooth and convex, so this always ends
            candidate = params + step * direction
            new_loss, new_grad = _loss_and_gradient(candidate, x, onehot, sample_weights, l2)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = candidate - params, new_grad - grad
        sy = float(s @ y)
        if sy > 1e-12:
            steps.append((s, y, 1.0 / sy))
            if len(steps) > LBFGS_MEMORY:
                steps.pop(0)
        improvement = loss - new_loss
        params, loss, grad = candidate, new_loss, new_grad
        if improvement <= 1e-10 * max(1.0, abs(loss)):
            break
    weight = params[:size].reshape(num_classes, x.shape[1])
    return LinearHead(weight=weight, bias=params[size:].copy(), iterations=iterations)


def _two_loop(grad: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    q = grad.copy()
    alphas = []
    for s, y, rho in reversed(steps):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        s, y, _ = steps[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), alpha in zip(steps, reversed(alphas), strict=True):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return -q


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per photo: each class's photos dealt round-robin (after a seeded shuffle) over the folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # so small classes do not all start in fold 0
    return assignment
