import torch


def head_entropy(weights):
    per_query = -torch.special.xlogy(weights, weights).sum(-1)  # (..., T)
    seen = (weights.sum(-1) > 0).float()  # 1 for queries that saw a key
    return (per_query * seen).sum(-1) / seen.sum(-1)
