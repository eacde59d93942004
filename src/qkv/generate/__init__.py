"""Generation: how a next-token predictor writes text, one token at a time.

A language model gives, for a sequence x_1 .. x_t, a distribution p(x_{t+1} | x_1 .. x_t).
Writing is a loop around it:

    1. predict   run the model, take the distribution over the next token
    2. choose    the most likely token (greedy), a sample (temperature, top-k, top-p, min-p),
                 or keep several candidates at once (beam search)
    3. append    add the token to the sequence
    4. repeat    until the end-of-sequence token (or a stop string) appears, or a length limit

Run naively, step t re-reads the whole sequence: t positions through every layer, attention
over t x t pairs, so n new tokens cost O(n^2) positions of work and O(n^3) attention scores.
But under a causal mask the keys and values of past positions never change. The KV cache
(``qkv.attention.kv_cache``) keeps them: the prompt is read once (the prefill), then each step
feeds only the newest token, computes its query, key and value, appends the key and value and
attends over the cache. A step then costs one position through the layers plus attention over
S cached keys: linear in the length, instead of recomputing everything before it.

Files:
    sampling.py   the choice: greedy, temperature, top-k, top-p, min-p, repetition penalty
    decode.py     the loop (prefill, cached steps, stop tokens and strings, padded batches),
                  ``generate`` and ``stream``
    beam.py       beam search (transformers-identical), caches reordered, not recomputed
    cached.py     the two model protocols (decoder-only, encoder-decoder) behind one interface
    stopping.py   when a row has ended
    settings.py   every option checked once

Example:
    >>> import torch
    >>> from qkv.generate import generate
    >>> from qkv.models.gpt import GPT, PRESETS
    >>> model = GPT(PRESETS["tiny"])
    >>> prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])  # row 0 is left-padded
    >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    >>> generate(model, prompts, mask, max_new_tokens=5, eos_token_id=[]).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from qkv.generate.beam import beam_search
from qkv.generate.decode import generate, stream
from qkv.generate.sampling import (
    greedy,
    min_p_filter,
    process_logits,
    repetition_penalty,
    sample,
    temperature,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "beam_search",
    "generate",
    "greedy",
    "min_p_filter",
    "process_logits",
    "repetition_penalty",
    "sample",
    "stream",
    "temperature",
    "top_k_filter",
    "top_p_filter",
]
