"""Exercises of page 11, loading weights: GPT-2's size by hand, LLaMA's names, GPT-2's fused
q/k/v matrix, a whole GPT-2 checkpoint converted.

Shape legend: D model width · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseFailed, CaseResult, Exercise, call, require
from qkv.interop.hf_gpt2 import weights_from_hf, weights_to_hf
from qkv.interop.hf_llama import llama_weights_to_hf
from qkv.models.gpt import GPT, GPTConfig
from qkv.models.llama import Llama, LlamaConfig

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/11-loading-weights.md"


def _size(config: GPTConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return GPT(config).num_parameters()


def check_size_by_hand(answer: Any) -> Iterator[CaseResult]:
    c = GPTConfig()  # GPT-2 small, the defaults
    d, f, n = c.d_model, c.ff_width, c.n_layers
    want = _size(c)
    yield compare_number(
        answer,
        want,
        tol=0.5,
        hint="V·D + 1024·D for the embeddings; per layer two LayerNorms (2D each), c_attn "
        "D·3D + 3D, attn.c_proj D·D + D, c_fc D·F + F, mlp.c_proj F·D + D; a final LayerNorm "
        "2D; the tied head adds nothing",
        wrong=[
            (_size(replace(c, tie_embeddings=False)), "the head is tied: lm_head is the token "
             "embedding itself, so its V·D numbers count once"),
            (want - c.max_seq_len * d, "count the learned position embeddings (1024 x D) too"),
            (want - n * (3 * d + d + f + d), "count the biases of the linear layers too"),
            (want - 2 * d * (2 * n + 1), "count the LayerNorms' gains and biases too"),
        ],
    )  # fmt: skip


def _llama_names(n_layers: int) -> dict[str, str]:
    """Hugging Face name -> qkv name, from qkv's converter applied to a model's own names."""
    config = LlamaConfig(
        vocab_size=16, d_model=8, n_layers=n_layers, n_heads=2, n_kv_heads=1, d_ff=16
    )
    with torch.device("meta"):
        ours = Llama(config).state_dict()
    name_of = {id(t): name for name, t in ours.items()}
    return {theirs: name_of[id(t)] for theirs, t in llama_weights_to_hf(ours, config).items()}


def _swap_norms(name: str) -> str:
    return name.replace("attn_norm", "#").replace("mlp_norm", "attn_norm").replace("#", "mlp_norm")


_NAME_MISTAKES: list[tuple[Callable[[str], str], str]] = [
    (lambda ours: "model." + ours, "drop the `model.` prefix: qkv's names start at tok_emb, "
     "layers.{i}, final_norm"),
    (_swap_norms, "input_layernorm is the norm before attention (attn_norm), "
     "post_attention_layernorm the one before the MLP (mlp_norm)"),
    (lambda ours: ours.replace("out_proj", "o_proj"), "o_proj is W_O, the output projection: "
     "qkv calls it self_attn.out_proj"),
    (lambda ours: ours.replace("tok_emb", "embed_tokens").replace("final_norm", "norm"),
     "embed_tokens is qkv's tok_emb and model.norm its final_norm"),
]  # fmt: skip


def _compare_name(tested: str, got: object, want: str) -> CaseResult:
    if got == want:
        return CaseResult(tested, True)
    problem = f"returned {got!r}, not qkv's name"
    hints = [h for mistake, h in _NAME_MISTAKES if got == mistake(want)]
    return CaseResult(tested, False, problem, hints[0] if hints else "see the table of page 11")


def check_llama_names(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    table = _llama_names(n_layers=12)
    groups = {
        "the names outside the layers": [n for n in table if ".layers." not in n],
        "the nine names of layer 0": [n for n in table if ".layers.0." in n],
        "the names of layer 11 (a two-digit index)": [n for n in table if ".layers.11." in n],
    }
    for group, names in groups.items():
        for name in names:
            tested = f"{group}: {name!r}"
            require(_compare_name(tested, call(tested, "qkv_name(name)", fn, name), table[name]))
        yield CaseResult(group, True)


def _checkpoint(seed: int, d_model: int, n_layers: int) -> tuple[GPTConfig, dict[str, Tensor]]:
    """A random GPT's weights in Hugging Face's GPT-2 layout, written by qkv's converter."""
    config = GPTConfig(vocab_size=20, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=9)
    with torch.device("meta"):
        shapes = GPT(config).state_dict()
    g = generator(seed)
    return config, weights_to_hf({n: randn(g, *t.shape) for n, t in shapes.items()}, config)


def check_split_c_attn(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, d in enumerate([8, 12, 30]):
        config, hf = _checkpoint(1100 + seed, d, n_layers=1)
        want = weights_from_hf(hf, config)
        c_attn = hf["transformer.h.0.attn.c_attn.weight"]  # (D, 3D)
        tested = f"c_attn.weight ({d}, {3 * d})"
        parts = ("w_q", "w_k", "w_v")
        got = call(tested, "split_c_attn(weight)", fn, c_attn.clone(), returns=parts)
        for i, piece in enumerate(c_attn.split(d, dim=1)):  # 3 x (D, D), still (in, out)
            require(compare_tensor(
                tested,
                got[i],
                want[f"layers.0.self_attn.{'qkv'[i]}_proj.weight"],
                what=parts[i],
                hint="cut c_attn along its output axis (dim 1) into three (D, D) blocks, q | k "
                "| v, and transpose each to nn.Linear's (out, in)",
                wrong=[
                    (piece, "Conv1D stores (in, out): transpose each piece to nn.Linear's (out, "
                     "in)"),
                    (c_attn.view(d, d, 3)[..., i].T, "q, k and v are three blocks of D columns "
                     "side by side, not interleaved column by column"),
                    (c_attn.chunk(3, dim=0)[i], "cut along the output axis, dim 1 of the (in, "
                     "out) = (D, 3D) matrix"),
                ],
            ))  # fmt: skip
        yield CaseResult(tested, True)


def _compare_state(tested: str, got: object, want: dict[str, Tensor]) -> CaseResult:
    """A pass when ``got`` holds exactly ``want``'s names and tensors; the case fails (raises
    CaseFailed) at the first difference otherwise."""
    if not isinstance(got, dict):
        raise CaseFailed(
            CaseResult(
                tested,
                False,
                f"returned a {type(got).__name__}",
                "return a dict: qkv name -> tensor",
            )
        )
    missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
    if missing:
        hint = "every name of GPT(config).state_dict() needs a tensor"
        if "lm_head.weight" in missing:
            hint = "the head is tied: lm_head.weight is tok_emb.weight (the file leaves it out)"
        problem = f"{len(missing)} of qkv's names missing: {missing[:3]}"
        raise CaseFailed(CaseResult(tested, False, problem, hint))
    if extra:
        hint = "rename every tensor to qkv's name"
        if any(n.endswith((".attn.bias", ".attn.masked_bias")) for n in extra):
            hint = "attn.bias is GPT-2's old causal-mask buffer: qkv builds its mask, drop it"
        raise CaseFailed(
            CaseResult(tested, False, f"names qkv's GPT does not have: {extra[:3]}", hint)
        )
    for name, tensor in want.items():
        require(compare_tensor(
            tested,
            got[name],
            tensor,
            what=repr(name),
            hint="the tensor of that name, transposed where GPT-2's Conv1D stored (in, out)",
            wrong=[(tensor.T if tensor.dim() == 2 else None, "Conv1D stores (in, out): "
                    "transpose it to nn.Linear's (out, in)")],
        ))  # fmt: skip
    return CaseResult(tested, True)


def check_gpt2_to_qkv(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (d, layers, style) in enumerate(
        [(8, 1, "GPT2LMHeadModel"), (12, 2, "GPT2LMHeadModel"), (16, 3, "GPT2Model")]
    ):
        config, hf = _checkpoint(1110 + seed, d, layers)
        want = weights_from_hf(hf, config)
        if style == "GPT2Model":  # no `transformer.` prefix, and the old mask buffers
            hf = {n.removeprefix("transformer."): t for n, t in hf.items()}
            hf |= {f"h.{i}.attn.bias": torch.ones(1, 1, 9, 9).tril() for i in range(layers)}
        tested = f"{style} checkpoint, D={d}, L={layers}"
        clones = {n: t.clone() for n, t in hf.items()}
        got = call(tested, "gpt2_to_qkv(tensors, n_layers)", fn, clones, layers)
        yield _compare_state(tested, got, want)


EXERCISES = [
    Exercise(
        id="11.1",
        title="GPT-2's size by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "GPT-2 small: V = 50257 tokens, 1024 learned positions, D = 768, L = 12 layers, "
            "F = 3072; every linear layer and LayerNorm has a bias, and the output head is tied "
            "to the token embedding. How many parameters does it have? `ANSWER = ...` "
            "(exactly)."
        ),
        check=check_size_by_hand,
    ),
    Exercise(
        id="11.2",
        title="LLaMA's names in qkv",
        kind="code",
        name="qkv_name",
        statement=(
            "Write `qkv_name(hf_name)` -> str: the name qkv's Llama gives the tensor that a "
            "Hugging Face LLaMA checkpoint calls `hf_name` (as in the table of page 11), e.g. "
            "'model.layers.3.mlp.up_proj.weight' -> 'layers.3.mlp.up_proj.weight'. The names "
            "are those of model.embed_tokens, model.norm, lm_head and the nine tensors of each "
            "layer."
        ),
        check=check_llama_names,
    ),
    Exercise(
        id="11.3",
        title="Splitting GPT-2's c_attn",
        kind="code",
        name="split_c_attn",
        statement=(
            "Write `split_c_attn(weight)` -> (w_q, w_k, w_v): weight (D, 3D) is a GPT-2 "
            "c_attn.weight, stored by Conv1D as (in, out) with the outputs q | k | v side by "
            "side; return the three (D, D) weights in nn.Linear's (out, in) layout, as qkv's "
            "q_proj, k_proj and v_proj hold them."
        ),
        check=check_split_c_attn,
    ),
    Exercise(
        id="11.4",
        title="A GPT-2 checkpoint into qkv",
        kind="code",
        name="gpt2_to_qkv",
        statement=(
            "Write `gpt2_to_qkv(tensors, n_layers)` -> dict: tensors is a GPT-2 checkpoint in "
            "Hugging Face's layout (names with the `transformer.` prefix of GPT2LMHeadModel or "
            "without it, as GPT2Model saves them; old files also hold h.{i}.attn.bias, a mask "
            "buffer to drop); return the state dict of qkv's GPT: every name of "
            "GPT(config).state_dict(), Conv1D weights transposed, c_attn split into "
            "q_proj, k_proj and v_proj (weights and biases), lm_head.weight tied to "
            "tok_emb.weight."
        ),
        check=check_gpt2_to_qkv,
    ),
]
