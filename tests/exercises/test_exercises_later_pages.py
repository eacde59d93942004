"""The exercises of pages 11, 12, 14 and 15: plausible wrong answers, each failing with the
hint aimed at it.

``WRONG`` joins the list of test_exercises.py, whose tests run every entry (the hint, and that
the output never shows the solution); the tests below check what is particular to these pages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from qkv.cli.main import main
from qkv.exercises import EXERCISES
from qkv.exercises.grading import grade

SOLUTIONS = Path(__file__).resolve().parent / "solutions"


# --- 11, loading weights ---------------------------------------------------------------------


def solution(exercise_id: str, name: str) -> Any:
    """The reference solution's function ``name``, to build a wrong answer from."""
    namespace: dict[str, Any] = {}
    exec((SOLUTIONS / EXERCISES[exercise_id].file_name).read_text(), namespace)
    return namespace[name]


def qkv_name_keeps_prefix(hf_name: str) -> str:
    right = solution("11.2", "qkv_name")(hf_name)
    return "model." + right if hf_name.startswith("model.") else right


def qkv_name_swaps_norms(hf_name: str) -> str:
    right = solution("11.2", "qkv_name")(hf_name)
    swapped = right.replace("attn_norm", "#").replace("mlp_norm", "attn_norm")
    return swapped.replace("#", "mlp_norm")


def split_without_transpose(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return weight.split(weight.shape[0], dim=1)


def gpt2_to_qkv_untied(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, Any]:
    out = solution("11.4", "gpt2_to_qkv")(tensors, n_layers)
    return {k: v for k, v in out.items() if k != "lm_head.weight"}


def gpt2_to_qkv_keeps_buffers(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, Any]:
    out = solution("11.4", "gpt2_to_qkv")(tensors, n_layers)
    return {**out, **{k: v for k, v in tensors.items() if k.endswith(".attn.bias")}}


# --- 12, fine-tuning -------------------------------------------------------------------------


def lora_forward_alpha(x: Any, weight: Any, bias: Any, lora_A: Any, lora_B: Any, alpha: Any) -> Any:
    return x @ weight.T + bias + alpha * (x @ lora_A.T @ lora_B.T)


def merge_lora_unscaled(weight: Any, lora_A: Any, lora_B: Any, alpha: Any) -> Any:
    return weight + lora_B @ lora_A


def merge_lora_delta_only(weight: Any, lora_A: Any, lora_B: Any, alpha: Any) -> Any:
    return (alpha / lora_A.shape[0]) * (lora_B @ lora_A)


def _kl_sum(p_logits: Any, q_logits: Any, targets: Any, tau: float) -> Any:
    keep = targets.reshape(-1) != -100
    v = p_logits.shape[-1]
    log_p = F.log_softmax(p_logits.reshape(-1, v)[keep] / tau, dim=-1)
    log_q = F.log_softmax(q_logits.reshape(-1, v)[keep] / tau, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def distillation_without_tau_squared(student: Any, teacher: Any, targets: Any, tau: Any) -> Any:
    return _kl_sum(teacher, student, targets, tau)


def distillation_kl_reversed(student: Any, teacher: Any, targets: Any, tau: Any) -> Any:
    return tau**2 * _kl_sum(student, teacher, targets, tau)


# --- 14, retrieval ---------------------------------------------------------------------------


def mean_pool_with_padding(hidden: Any, attention_mask: Any) -> Any:
    return F.normalize(hidden.mean(dim=1), dim=-1)


def mean_pool_not_normalised(hidden: Any, attention_mask: Any) -> Any:
    real = attention_mask.unsqueeze(-1).float()
    return (hidden * real).sum(1) / real.sum(1)


def top_k_dot_product(queries: Any, passages: Any, k: int) -> Any:
    return tuple((queries @ passages.T).topk(k, dim=-1))


def recall_as_precision(indices: Any, relevant: Any, k: int) -> float:
    return relevant.gather(1, indices[:, :k]).float().mean().item()


def recall_all_ranks(indices: Any, relevant: Any, k: int) -> float:
    return relevant.gather(1, indices).any(dim=1).float().mean().item()


# --- 15, build a GPT -------------------------------------------------------------------------


def bigram_counts_transposed(ids: Any, vocab_size: int) -> Any:
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    for a, b in zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True):
        counts[b, a] += 1
    return counts


def bigram_counts_wrapping(ids: Any, vocab_size: int) -> Any:
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    for a, b in zip(ids.tolist(), ids.roll(-1).tolist(), strict=True):
        counts[a, b] += 1
    return counts


def average_future(x: Any) -> Any:
    t = x.shape[1]
    ones = torch.triu(torch.ones(t, t))
    return ones / ones.sum(dim=1, keepdim=True) @ x


def average_without_dividing(x: Any) -> Any:
    return torch.tril(torch.ones(x.shape[1], x.shape[1])) @ x


def _head(x: Any, w_q: Any, w_k: Any, w_v: Any, *, masked: bool, scale: float) -> Any:
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    scores = q @ k.transpose(1, 2) * scale
    if masked:
        t = x.shape[1]
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return scores.softmax(dim=-1) @ v


def head_without_mask(x: Any, w_q: Any, w_k: Any, w_v: Any) -> Any:
    return _head(x, w_q, w_k, w_v, masked=False, scale=w_q.shape[0] ** -0.5)


def head_scaled_by_d_model(x: Any, w_q: Any, w_k: Any, w_v: Any) -> Any:
    return _head(x, w_q, w_k, w_v, masked=True, scale=x.shape[-1] ** -0.5)


def _heads(x: Any, heads: Any) -> Any:
    return [_head(x, *w, masked=True, scale=w[0].shape[0] ** -0.5) for w in heads]


def multi_head_reversed(x: Any, heads: Any, w_o: Any, b_o: Any) -> Any:
    return torch.cat(_heads(x, heads)[::-1], dim=-1) @ w_o.T + b_o


def multi_head_no_projection(x: Any, heads: Any, w_o: Any, b_o: Any) -> Any:
    return torch.cat(_heads(x, heads), dim=-1)


_PARAMETERS_GPT2 = 124_439_808

# (exercise, wrong answer, a phrase its hint must contain)
WRONG: list[tuple[str, Any, str]] = [
    ("11.1", _PARAMETERS_GPT2 + 50257 * 768, "the head is tied"),
    ("11.1", _PARAMETERS_GPT2 - 1024 * 768, "position embeddings"),
    ("11.2", qkv_name_keeps_prefix, "drop the `model.` prefix"),
    ("11.2", qkv_name_swaps_norms, "input_layernorm is the norm before attention"),
    ("11.3", split_without_transpose, "Conv1D stores (in, out)"),
    ("11.4", gpt2_to_qkv_untied, "the head is tied"),
    ("11.4", gpt2_to_qkv_keeps_buffers, "old causal-mask buffer"),
    ("12.1", 12 * 2 * 8 * 768, "two matrices, A (r x d_in) and B (d_out x r)"),
    ("12.1", 12 * 2 * 768 * 768, "full fine-tuning"),
    ("12.2", lora_forward_alpha, "alpha / r, not alpha"),
    ("12.3", merge_lora_unscaled, "scale the update by alpha / r"),
    ("12.3", merge_lora_delta_only, "add the update to W"),
    ("12.4", distillation_without_tau_squared, "multiply by τ²"),
    ("12.4", distillation_kl_reversed, "KL the other way"),
    ("14.1", 10, "that is the dot product"),
    ("14.1", 2, "divide by both lengths"),
    ("14.2", mean_pool_with_padding, "leave the padding out"),
    ("14.2", mean_pool_not_normalised, "length 1"),
    ("14.3", top_k_dot_product, "normalise queries and passages"),
    ("14.4", recall_as_precision, "precision@k"),
    ("14.4", recall_all_ranks, "first k ranks only"),
    ("15.1", math.log2(103), "bits"),
    ("15.1", 1 / 103, "minus its natural logarithm"),
    ("15.2", bigram_counts_transposed, "row = the current character"),
    ("15.2", bigram_counts_wrapping, "no successor"),
    ("15.3", average_future, "averages the future"),
    ("15.3", average_without_dividing, "divide each row"),
    ("15.4", head_without_mask, "mask the future"),
    ("15.4", head_scaled_by_d_model, "not sqrt(D)"),
    ("15.5", multi_head_reversed, "head 0 first"),
    ("15.5", multi_head_no_projection, "output projection"),
]


def test_every_exercise_of_these_pages_has_a_wrong_answer() -> None:
    pages = {"11", "12", "14", "15"}
    assert {w[0] for w in WRONG} == {i for i, e in EXERCISES.items() if e.page in pages}


def test_a_state_dict_with_a_transposed_tensor_names_it() -> None:
    """11.4: one Conv1D weight left untransposed is named, with the hint to transpose it."""
    right = solution("11.4", "gpt2_to_qkv")

    def one_left_as_is(tensors: dict[str, Any], n_layers: int) -> dict[str, Any]:
        out = right(tensors, n_layers)
        return {**out, "layers.0.mlp.up_proj.weight": out["layers.0.mlp.up_proj.weight"].T}

    report = grade(EXERCISES["11.4"], one_left_as_is)
    failed = report.cases[-1]
    assert not report.passed and "'layers.0.mlp.up_proj.weight'" in failed.problem
    assert "transpose" in failed.hint


def test_the_multi_head_solution_reuses_its_neighbour(capsys: pytest.CaptureFixture[str]) -> None:
    """``qkv check`` puts the file's folder on sys.path: 15.5's solution imports 15.4's head."""
    assert main(["check", "15.5", str(SOLUTIONS)]) == 0
    assert "passed: all 3 cases." in capsys.readouterr().out
