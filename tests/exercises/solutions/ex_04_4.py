import torch


def alibi_bias(slopes, t, s):
    query_pos = torch.arange(s - t, s)[:, None]  # (T, 1)
    key_pos = torch.arange(s)[None, :]  # (1, S)
    distance = (query_pos - key_pos).abs()  # (T, S)
    return -slopes[:, None, None] * distance  # (H, T, S)
