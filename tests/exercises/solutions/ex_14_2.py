def mean_pool(hidden, attention_mask):
    real = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    mean = (hidden * real).sum(dim=1) / real.sum(dim=1)  # (B, D)
    return mean / mean.norm(dim=-1, keepdim=True)
