import torch


def sliding_window_mask(t, window, s=None):
    s = t if s is None else s
    query_pos = torch.arange(s - t, s)[:, None]  # (T, 1): the last T positions
    key_pos = torch.arange(s)[None, :]  # (1, S)
    distance = query_pos - key_pos  # (T, S)
    return (distance >= 0) & (distance < window)  # (T, S)
