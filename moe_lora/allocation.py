"""Layer-wise expert allocation (MoLA, arXiv 2402.08562): how many experts, and which k, each layer gets.

``num_experts`` (and ``top_k``) may be

* an int: every layer the same;
* a list with one entry per layer;
* a list of G entries (G < number of layers): G groups of consecutive layers, as MoLA's four groups of
  eight layers of LLaMA-2-7B;
* a named shape with a budget (the sum over the G groups), which reproduces MoLA's tables exactly for G = 4:

  ====================  ===========  ===========
  shape                 budget 20    budget 16
  ====================  ===========  ===========
  rectangle             5 5 5 5      4 4 4 4
  triangle              8 6 4 2      6 5 3 2
  inverted_triangle     2 4 6 8      2 3 5 6
  hourglass             8 2 2 8      6 2 2 6
  diamond               2 8 8 2      2 6 6 2
  ====================  ===========  ===========

Rule for any G and budget (documented so that other depths are predictable): group g gets a weight w_g in
[1, 4] on a linear profile (triangle: w_g = 1 + 3 (G-1-g)/(G-1); inverted_triangle: reversed; hourglass:
w_g = 1 + 3 (m_max - m_g)/m_max with m_g = min(g, G-1-g) the distance to the nearer end; diamond:
w_g = 1 + 3 m_g/m_max; rectangle: w_g = 1), then E_g = budget * w_g / sum(w), rounded by largest remainder
(ties to the earlier group) with every group at least 1. For G = 4 this gives the table above.

Layers are split into G groups of consecutive layers like ``numpy.array_split``: when the layer count is
not a multiple of G the first groups get one layer more.
"""

from __future__ import annotations

import math

SHAPES = ("rectangle", "triangle", "inverted_triangle", "hourglass", "diamond")


def shape_weights(shape: str, num_groups: int) -> list[float]:
    """The profile w_g in [1, 4] of a named shape over ``num_groups`` groups."""
    G = num_groups
    if shape not in SHAPES:
        raise ValueError(f"num_experts: unknown allocation shape {shape!r}; allowed: {', '.join(SHAPES)}")
    if G == 1 or shape == "rectangle":
        return [1.0] * G
    if shape in ("triangle", "inverted_triangle"):
        w = [1.0 + 3.0 * (G - 1 - g) / (G - 1) for g in range(G)]
        return w if shape == "triangle" else w[::-1]
    m = [min(g, G - 1 - g) for g in range(G)]
    m_max = max(m)
    if m_max == 0:  # G == 2: no middle; hourglass keeps both ends high, diamond both low
        return [4.0] * G if shape == "hourglass" else [1.0] * G
    if shape == "hourglass":
        return [1.0 + 3.0 * (m_max - mg) / m_max for mg in m]
    return [1.0 + 3.0 * mg / m_max for mg in m]


def shape_allocation(shape: str, budget: int, num_groups: int = 4) -> list[int]:
    """Experts per group for a named shape: sums to ``budget``, each group at least 1."""
    if budget < num_groups:
        raise ValueError(f"expert_budget: {budget} is smaller than the number of groups {num_groups}")
    w = shape_weights(shape, num_groups)
    exact = [budget * wg / sum(w) for wg in w]
    alloc = [max(1, math.floor(v)) for v in exact]
    # Largest remainder; ties go to the earlier group. Rounding up only while under budget.
    order = sorted(range(num_groups), key=lambda g: (-(exact[g] - math.floor(exact[g])), g))
    i = 0
    while sum(alloc) < budget:
        alloc[order[i % num_groups]] += 1
        i += 1
    while sum(alloc) > budget:  # only when the max(1, .) floor pushed us over
        g = max(range(num_groups), key=lambda j: (alloc[j], -j))
        alloc[g] -= 1
    return alloc


def group_of_layers(num_layers: int, num_groups: int) -> list[int]:
    """Group index of each layer when ``num_layers`` layers form ``num_groups`` consecutive groups."""
    base, extra = divmod(num_layers, num_groups)
    sizes = [base + (1 if g < extra else 0) for g in range(num_groups)]
    return [g for g, size in enumerate(sizes) for _ in range(size)]


def per_layer(value, num_layers: int, field: str, budget: int = 20, num_groups: int = 4) -> list[int]:
    """Expand an int / per-layer list / per-group list / named shape into one int per layer."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: {value!r} is not a number of experts")
    if isinstance(value, int):
        return [value] * num_layers
    if isinstance(value, str):
        groups = shape_allocation(value, budget, num_groups)
        return [groups[g] for g in group_of_layers(num_layers, num_groups)]
    values = list(value)
    if len(values) == num_layers:
        return values
    if 0 < len(values) < num_layers:
        return [values[g] for g in group_of_layers(num_layers, len(values))]
    raise ValueError(
        f"{field}: a list of {len(values)} entries does not fit a model with {num_layers} layers "
        f"(give one entry per layer, or fewer entries for groups of consecutive layers)"
    )
