import torch


def sinusoidal_table(n_positions, d_model):
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (N, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (D/2,)
    angles = pos / 10000 ** (two_i / d_model)  # (N, D/2)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()
    return table.float()
