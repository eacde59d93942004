import torch


def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the tokens before each one
    drop = before >= p
    drop[..., 0] = False
    keep_in_order = torch.empty_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(keep_in_order, float("-inf"))
