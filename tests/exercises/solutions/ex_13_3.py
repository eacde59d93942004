import torch


def load_balancing_loss(logits, k):
    n, x = logits.shape
    chosen = logits.topk(k, dim=-1).indices  # (N, k)
    picked = torch.zeros(n, x).scatter(1, chosen, 1.0)  # (N, X): 1 where expert i was chosen
    f = picked.mean(dim=0)  # (X,) share of tokens per expert, sums to k
    p = torch.softmax(logits, dim=-1).mean(dim=0)  # (X,) mean router probability
    return x * (f * p).sum()
