import torch


def rope(x, positions):
    e = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, e, 2).float() / e)  # (E/2,)
    angles = positions.float()[:, None] * theta  # (T, E/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., : e // 2], x[..., e // 2 :]  # the pairs (x[i], x[i + E/2])
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
