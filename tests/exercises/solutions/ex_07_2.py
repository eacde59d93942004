import torch


def cross_entropy(logits, targets):
    v = logits.shape[-1]
    logits, targets = logits.reshape(-1, v), targets.reshape(-1)
    keep = targets != -100
    logits, targets = logits[keep], targets[keep]
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None])[:, 0]
    return nll.mean()
