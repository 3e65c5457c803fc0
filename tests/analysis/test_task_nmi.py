"""task_expert_nmi: mutual information between a token's task and its experts, against the joint-table formula."""

from __future__ import annotations

import math

import pytest

from moe_lora.analysis import task_expert_nmi


def layer(load_by_task: dict, tokens_by_task: dict, E: int, active: float = 2.0) -> dict:
    return {
        "load_by_task": load_by_task,
        "tokens_by_task": tokens_by_task,
        "num_experts": E,
        "mean_active_experts": active,
    }


def joint_mi(load_by_task: dict, tokens_by_task: dict) -> float:
    """I(T; E) = sum_{t,e} p(t,e) log p(t,e) / (p(t) p(e)) with p(t,e) = p(t) f_t[e] (the oracle)."""
    n = sum(tokens_by_task.values())
    p_te = {(t, e): tokens_by_task[t] / n * f for t, row in load_by_task.items() for e, f in enumerate(row)}
    p_t = {t: tokens_by_task[t] / n for t in load_by_task}
    E = len(next(iter(load_by_task.values())))
    p_e = [sum(p_te[t, e] for t in load_by_task) for e in range(E)]
    return sum(p * math.log(p / (p_t[t] * p_e[e])) for (t, e), p in p_te.items() if p > 0)


def test_disjoint_experts_give_one_and_shared_experts_zero():
    assert task_expert_nmi(
        layer({"a": [0.5, 0.5, 0, 0], "b": [0, 0, 0.5, 0.5]}, {"a": 10, "b": 10}, 4)
    ) == pytest.approx(1.0)
    assert task_expert_nmi(layer({"a": [0.25] * 4, "b": [0.25] * 4}, {"a": 3, "b": 9}, 4)) == pytest.approx(0.0)


def test_matches_the_joint_table_formula_with_unequal_tasks():
    by_task = {"a": [0.4, 0.3, 0.2, 0.1], "b": [0.1, 0.1, 0.5, 0.3], "c": [0.25, 0.25, 0.25, 0.25]}
    tokens = {"a": 7, "b": 3, "c": 11}
    expected = joint_mi(by_task, tokens) / math.log(3)  # log min(E = 4, 3 tasks)
    assert task_expert_nmi(layer(by_task, tokens, 4)) == pytest.approx(expected, rel=1e-12)


def test_undefined_cases_are_none():
    assert task_expert_nmi(layer({"a": [1.0]}, {"a": 5}, 1)) is None  # one expert
    assert task_expert_nmi(layer({"a": [0.5, 0.5]}, {"a": 5}, 2)) is None  # one task
    assert task_expert_nmi(layer({"a": [0.5, 0.5], "b": [0.5, 0.5]}, {"a": 1, "b": 1}, 2, active=2.0)) is None
