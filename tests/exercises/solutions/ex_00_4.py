import torch


def additive_attention(s_prev, h, W, U, v):
    hidden = torch.tanh((s_prev @ W.T).unsqueeze(-2) + h @ U.T)  # (..., S, A)
    scores = hidden @ v  # (..., S): e_j = v · tanh(W s_prev + U h_j)
    weights = torch.softmax(scores, dim=-1)  # (..., S)
    context = (weights.unsqueeze(-2) @ h).squeeze(-2)  # (..., Dh): sum_j α_j h_j
    return context, weights
