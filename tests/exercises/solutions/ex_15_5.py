import torch
from ex_15_4 import causal_head  # the head of exercise 15.4, in the same folder


def multi_head(x, heads, w_o, b_o):
    out = torch.cat([causal_head(x, *head) for head in heads], dim=-1)  # (B, T, H * E)
    return out @ w_o.T + b_o  # (B, T, D)
