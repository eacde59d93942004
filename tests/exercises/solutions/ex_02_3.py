import torch


def padding_mask(lengths, s):
    real = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    return real[:, None, None, :]  # (B, 1, 1, S)
