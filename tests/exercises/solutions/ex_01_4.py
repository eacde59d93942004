import torch


def attention(q, k, v, scale=None):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1) * scale  # (..., T, S)
    weights = torch.softmax(scores, dim=-1)  # (..., T, S)
    return weights @ v, weights
