import torch


def causal_mask(t, s=None):
    s = t if s is None else s
    query_pos = torch.arange(s - t, s)[:, None]  # (T, 1): the last T positions
    key_pos = torch.arange(s)[None, :]  # (1, S)
    return key_pos <= query_pos  # (T, S)
