"""The exercises of page 13: plausible wrong answers, each failing with the hint aimed at it.

``WRONG`` joins the list of test_exercises.py, whose tests run every entry (the hint, and that
the output never shows the solution); the tests below check what is particular to this page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qkv.cli.main import main
from qkv.exercises import EXERCISES, PAGES
from qkv.exercises.grading import grade

SOLUTIONS = Path(__file__).resolve().parent / "solutions"


def solution(exercise_id: str, name: str) -> Any:
    """The reference solution's function ``name``, to build a wrong answer from."""
    namespace: dict[str, Any] = {}
    exec((SOLUTIONS / EXERCISES[exercise_id].file_name).read_text(), namespace)
    return namespace[name]


# --- 13.2, top-k routing ----------------------------------------------------------------------


def route_switch_gates(logits: Any, k: int) -> Any:
    experts = logits.topk(k, dim=-1).indices
    return logits.softmax(dim=-1).gather(-1, experts), experts


def route_smallest(logits: Any, k: int) -> Any:
    top, experts = logits.topk(k, dim=-1, largest=False)
    return top.softmax(dim=-1), experts


def route_ascending(logits: Any, k: int) -> Any:
    gates, experts = solution("13.2", "route")(logits, k)
    return gates.flip(-1), experts.flip(-1)


def route_raw_logits(logits: Any, k: int) -> Any:
    return logits.topk(k, dim=-1)


def route_overflows(logits: Any, k: int) -> Any:
    top, experts = logits.topk(k, dim=-1)
    e = top.exp()
    return e / e.sum(dim=-1, keepdim=True), experts


# --- 13.3, the load-balancing loss ------------------------------------------------------------


def balance_first_choice(logits: Any, k: int) -> Any:
    return solution("13.3", "load_balancing_loss")(logits, 1)


def balance_without_x(logits: Any, k: int) -> Any:
    return solution("13.3", "load_balancing_loss")(logits, k) / logits.shape[-1]


def balance_probabilities_twice(logits: Any, k: int) -> Any:
    p = logits.softmax(dim=-1).mean(dim=0)
    return logits.shape[-1] * (p * p).sum()


# --- 13.4, capacity ---------------------------------------------------------------------------


def served_token_order(experts: Any, n_experts: int, capacity: Any) -> Any:
    out = torch.zeros(experts.shape, dtype=torch.bool)
    taken = [0] * n_experts
    for token, row in enumerate(experts.tolist()):
        for rank, e in enumerate(row):
            if capacity is None or taken[e] < capacity:
                out[token, rank], taken[e] = True, taken[e] + 1
    return out


def served_everything(experts: Any, n_experts: int, capacity: Any) -> Any:
    return torch.ones(experts.shape, dtype=torch.bool)


def served_one_too_many(experts: Any, n_experts: int, capacity: Any) -> Any:
    more = None if capacity is None else capacity + 1
    return solution("13.4", "served")(experts, n_experts, more)


# (exercise, wrong answer, a phrase its hint must contain)
WRONG: list[tuple[str, Any, str]] = [
    ("13.1", 101, "not 128"),
    ("13.1", 127, "largest *magnitude*"),
    ("13.2", route_switch_gates, "softmax over the k chosen logits only"),
    ("13.2", route_smallest, "*largest* logits"),
    ("13.2", route_ascending, "largest logit first"),
    ("13.2", route_raw_logits, "with a softmax"),
    ("13.2", route_overflows, "overflows"),
    ("13.3", balance_first_choice, "not only its first"),
    ("13.3", balance_without_x, "multiply by X"),
    ("13.3", balance_probabilities_twice, "a count of choices"),
    ("13.4", served_token_order, "first choices first"),
    ("13.4", served_everything, "at most C choices"),
    ("13.4", served_one_too_many, "off by one"),
]


def test_every_exercise_of_this_page_has_a_wrong_answer() -> None:
    assert PAGES["13"] == "docs/learn/13-cheaper-models.md"
    assert {w[0] for w in WRONG} == {i for i, e in EXERCISES.items() if e.page == "13"}


def test_the_routing_checker_accepts_qkvs_own_route() -> None:
    """qkv's ``route`` (float32 gates, Mixtral's softmax) is a right answer too."""
    from qkv.blocks.moe import route

    assert grade(EXERCISES["13.2"], route).passed


def test_check_page_13_from_the_command_line(capsys: Any) -> None:
    assert main(["check", "13.4", str(SOLUTIONS)]) == 0
    assert "passed: all 4 cases." in capsys.readouterr().out
