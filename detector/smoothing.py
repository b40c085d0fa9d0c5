"""A differentiable stand-in for a tree detector: every split ``x_f ≤ t`` softened to a sigmoid.

A decision tree or a gradient-boosted ensemble is piecewise constant in its features, so its gradient
is zero almost everywhere and an attacker who knows it cannot descend it as it is.  Replacing each
hard split by ``sigmoid((t − x_f) / T_f)`` weighs every leaf by the product of the sigmoids along its
path; the result is smooth and tends to the trees' own output as the temperature ``T`` → 0.  This is
what a white-box attacker descends in place of the trees (the attack then judges its iterates by the
real detector).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.tree import DecisionTreeClassifier

__all__ = ["SoftTrees", "soft_trees", "split_temperature"]


class SoftTrees:
    """The trees of a fitted binary classifier as leaf paths, evaluated softly in torch.

    ``path_node[l, d]`` is the d-th split on the way to leaf ``l`` (padded with −1), ``path_side``
    +1 where that path goes left (``x_f ≤ t``), −1 right, 0 on padding.  A boosted ensemble adds its
    leaf values to a baseline logit; a single tree mixes its leaves' adversarial shares into a
    probability, returned as a logit.
    """

    def __init__(self, feature: np.ndarray, threshold: np.ndarray, path_node: np.ndarray, path_side: np.ndarray,
                 leaf_value: np.ndarray, baseline: float, mixes_probabilities: bool):
        self.feature = feature
        self.threshold = threshold
        self.path_node = path_node
        self.path_side = path_side
        self.leaf_value = leaf_value
        self.baseline = baseline
        self.mixes_probabilities = mixes_probabilities

    def logit(self, rows: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
        """``[N]`` smoothed logit of P(adversarial) for feature rows ``[N, F]``; ``temperature`` is a
        scalar or one value per feature, in the features' own units."""
        device, dtype = rows.device, rows.dtype
        temperature = torch.as_tensor(temperature, dtype=dtype, device=device)
        if temperature.ndim == 0:
            temperature = temperature.expand(rows.shape[1])
        if temperature.shape != (rows.shape[1],) or not bool((temperature > 0).all()):
            raise ValueError(f"temperature must be positive, a scalar or one per feature ({rows.shape[1]})")
        node = torch.as_tensor(self.path_node.clip(min=0), device=device)
        side = torch.as_tensor(self.path_side, dtype=dtype, device=device)
        feature = torch.as_tensor(self.feature.clip(min=0), device=device)[node]  # [L, D]; leaves' −2 unused
        threshold = torch.as_tensor(self.threshold, dtype=dtype, device=device)[node]
        # log P(leaf) = Σ along its path of log σ(±(t − x_f) / T_f); padding contributes log 1 = 0
        split = (threshold - rows[:, feature]) / temperature[feature]  # [N, L, D]
        # Padding (side 0) must add exactly 0, also where a feature is infinite (0 · ∞ would be NaN).
        split = torch.where(side != 0, split, torch.zeros((), dtype=dtype, device=device))
        log_leaf = (torch.nn.functional.logsigmoid(side * split) * side.abs()).sum(dim=2)
        value = torch.as_tensor(self.leaf_value, dtype=dtype, device=device)
        if not self.mixes_probabilities:
            return self.baseline + log_leaf.exp() @ value
        # log P(adv) − log P(clean), each a log-sum over leaves: no clamp of the mixture that would
        # zero the gradient where it saturates (pure leaves, sharp temperatures)
        share = value.clamp(1e-7, 1 - 1e-7)
        return torch.logsumexp(log_leaf + share.log(), dim=1) - torch.logsumexp(log_leaf + (-share).log1p(), dim=1)


def _leaf_paths(roots: np.ndarray, left: np.ndarray, right: np.ndarray, is_leaf: np.ndarray):
    """(leaf ids, path_node, path_side) for trees stored as flat node arrays starting at ``roots``."""
    leaves, paths = [], []
    stack = [(int(r), ()) for r in roots]
    while stack:
        node, path = stack.pop()
        if is_leaf[node]:
            leaves.append(node)
            paths.append(path)
        else:
            stack.append((int(left[node]), path + ((node, 1),)))
            stack.append((int(right[node]), path + ((node, -1),)))
    depth = max(1, max(len(p) for p in paths))
    path_node = np.full((len(paths), depth), -1, dtype=np.int64)
    path_side = np.zeros((len(paths), depth), dtype=np.int64)
    for i, path in enumerate(paths):
        for d, (node, side) in enumerate(path):
            path_node[i, d], path_side[i, d] = node, side
    return np.asarray(leaves, dtype=np.int64), path_node, path_side


def _from_boosting(estimator: HistGradientBoostingClassifier) -> SoftTrees | None:
    # the compiled view's flat node arrays; imported here because estimator imports this module
    from .estimator import _compiled_boosting

    compiled = _compiled_boosting(estimator)
    if compiled is None:  # categorical splits, several trees per iteration: no stand-in
        return None
    leaves, path_node, path_side = _leaf_paths(compiled.roots, compiled.left, compiled.right, compiled.leaf)
    return SoftTrees(compiled.feature.astype(np.int64), compiled.threshold, path_node, path_side,
                     compiled.value[leaves], float(np.asarray(compiled.baseline).ravel()[0]),
                     mixes_probabilities=False)


def _from_tree(estimator: DecisionTreeClassifier) -> SoftTrees | None:
    tree = estimator.tree_
    if estimator.n_outputs_ != 1 or len(estimator.classes_) != 2:
        return None
    leaf = tree.children_left < 0
    leaves, path_node, path_side = _leaf_paths(np.array([0]), tree.children_left, tree.children_right, leaf)
    counts = tree.value[:, 0, :].astype(np.float64)
    share = counts[:, 1] / counts.sum(axis=1).clip(min=1e-300)  # the adversarial class's share per node
    return SoftTrees(tree.feature.astype(np.int64), tree.threshold.astype(np.float64), path_node, path_side,
                     share[leaves], 0.0, mixes_probabilities=True)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def soft_trees(estimator) -> SoftTrees | None:
    """The soft view of a fitted binary decision tree or histogram-boosting classifier (cached); None
    for anything else (another estimator, categorical splits, several outputs)."""
    if type(estimator) not in (DecisionTreeClassifier, HistGradientBoostingClassifier):
        return None
    try:
        return _CACHE[estimator]
    except KeyError:
        pass
    try:
        soft = _from_tree(estimator) if type(estimator) is DecisionTreeClassifier else _from_boosting(estimator)
    except (AttributeError, KeyError, ValueError):  # another scikit-learn layout: no stand-in
        soft = None
    _CACHE[estimator] = soft
    return soft


def split_temperature(clean_rows: torch.Tensor, softness: float) -> torch.Tensor:
    """One temperature per feature: ``softness`` robust spreads (1.4826 · median absolute deviation)
    of clean feature rows ``[N, F]``, the standard deviation where that spread is 0.

    A robust spread, because some features span orders of magnitude (raw ψ of confident inputs sits
    near 1e-7 with outliers near 1): their standard deviation is set by the outliers and would blur
    every split near the clean inputs into one.
    """
    if softness <= 0:
        raise ValueError(f"softness must be positive, got {softness}")
    rows = clean_rows.detach().double()
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"need at least two clean rows [N, F], got shape {tuple(rows.shape)}")
    spread = 1.4826 * (rows - rows.median(dim=0).values).abs().median(dim=0).values
    spread = torch.where(spread > 0, spread, rows.std(dim=0))
    return softness * spread.clamp_min(1e-12)

