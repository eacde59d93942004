import math

import torch


def causal_head(x, w_q, w_k, w_v):
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T  # (B, T, E) each
    t, e = x.shape[1], w_q.shape[0]
    scores = q @ k.transpose(1, 2) / math.sqrt(e)  # (B, T, T)
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v  # (B, T, E)
