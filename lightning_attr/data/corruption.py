"""Controlled corruptions of a training set, with the ground truth kept for evaluation.

- :func:`flip_labels`: mislabel a fraction of examples (each to a different, uniformly drawn class).
  Self-influence should rank the flipped examples first.
- :func:`backdoor_group`: stamp a trigger on every example of one source group and relabel those
  examples to a target class. Queries carrying the trigger are then explained by that group.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flip_labels(y: Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip ``round(fraction * n)`` labels, each to another class.

    Args:
        y: ``Tensor[n]`` int64 labels.
        fraction: in ``[0, 1)``.
        num_classes: number of classes (>= 2).
        seed: seed of a private generator (the global RNG is not touched).

    Returns:
        ``(y_noisy: Tensor[n], flipped: Tensor[n] bool)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label-noise fraction must be in [0, 1), got {fraction}.")
    if num_classes < 2:
        raise ValueError(f"flipping labels needs at least 2 classes, got {num_classes}.")
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    n_flip = int(round(fraction * n))
    flipped = torch.zeros(n, dtype=torch.bool)
    y_noisy = y.clone()
    if n_flip == 0:
        return y_noisy, flipped
    idx = torch.randperm(n, generator=gen)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=gen)  # never 0: the class always changes
    y_noisy[idx] = (y[idx] + shift) % num_classes
    flipped[idx] = True
    return y_noisy, flipped


def stamp_trigger(x: Tensor, size: int, value: float) -> Tensor:
    """Copy of ``x: Tensor[n, *shape]`` with its first ``size`` flattened features set to ``value``."""
    flat = x.reshape(len(x), -1).clone()
    if not 0 < size <= flat.shape[1]:
        raise ValueError(f"trigger size must be in [1, {flat.shape[1]}] (features per example), got {size}.")
    flat[:, :size] = value
    return flat.reshape(x.shape)


def backdoor_group(
    x: Tensor, y: Tensor, group: Tensor, poisoned_group: int, target: int, size: int = 4, value: float = 3.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Stamp the trigger on every example of ``poisoned_group`` and relabel them ``target``.

    Args:
        x: ``Tensor[n, *shape]`` standardized inputs.
        y: ``Tensor[n]`` labels.
        group: ``Tensor[n]`` int group of each example.
        poisoned_group: the group to poison (must occur in ``group``).
        target: the label the trigger should cause.
        size, value: the trigger: first ``size`` flattened features set to ``value``.

    Returns:
        ``(x_poisoned, y_poisoned, poisoned: Tensor[n] bool)``.
    """
    poisoned = group == poisoned_group
    if not poisoned.any():
        raise ValueError(f"poisoned group {poisoned_group} has no examples (groups present: {group.unique().tolist()}).")
    x, y = x.clone(), y.clone()
    x[poisoned] = stamp_trigger(x[poisoned], size, value)
    y[poisoned] = target
    return x, y, poisoned
