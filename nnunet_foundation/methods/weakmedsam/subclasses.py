"""Sub-Class Exploration: k-means of each class's positive slices in a frozen encoder's feature space; the classifier
then also learns these sub-class labels, which spreads its attention over the varied appearances of one class.

The paper clusters ImageNet ResNet-18 features; offline we use the frozen generalist's own image encoder (its
embedding average-pooled over the image), which needs no second network and no download.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def cluster_class(features: np.ndarray, num_subclasses: int, seed: int) -> np.ndarray:
    """k-means labels (0..K'-1) of ``(N, C)`` features; K' = min(K, N). Deterministic for a seed."""
    from sklearn.cluster import KMeans

    k = min(int(num_subclasses), len(features))
    if k <= 1:
        return np.zeros(len(features), dtype=np.int64)
    return KMeans(n_clusters=k, random_state=int(seed), n_init=10).fit_predict(
        np.asarray(features, dtype=np.float64)).astype(np.int64)


def explore_subclasses(features: np.ndarray, slice_labels: Sequence[Sequence[int]], num_classes: int,
                       num_subclasses: int = 8, seed: int = 0) -> List[Dict[int, int]]:
    """Per slice ``{class: sub-class}`` for the classes present in it (empty for negative slices)."""
    out: List[Dict[int, int]] = [dict() for _ in slice_labels]
    for c in range(1, num_classes + 1):
        members = [i for i, labels in enumerate(slice_labels) if c in labels]
        if not members:
            continue
        for i, sub in zip(members, cluster_class(features[members], num_subclasses, seed)):
            out[i][c] = int(sub)
    return out


def subclass_targets(subclasses: Dict[int, int], num_classes: int, num_subclasses: int) -> np.ndarray:
    """The ``(num_classes * K + 1)``-way multi-hot target: index 0 = "no class present", ``1 + (c-1) K + k`` = class
    c's sub-class k (the paper's K+1 outputs for one class, one block of K per class for several)."""
    target = np.zeros(num_classes * num_subclasses + 1, dtype=np.float32)
    if not subclasses:
        target[0] = 1
    for c, k in subclasses.items():
        target[1 + (c - 1) * num_subclasses + k] = 1
    return target
