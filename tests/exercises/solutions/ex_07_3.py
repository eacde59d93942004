import math


def warmup_cosine(step, *, peak, warmup_steps, max_steps, min_lr_ratio):
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    p = min(max((step - warmup_steps) / (max_steps - warmup_steps), 0.0), 1.0)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * p)) / 2)
