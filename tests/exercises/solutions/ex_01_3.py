import torch


def softmax(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.amax(dim=-1, keepdim=True)  # the largest entry of each row becomes 0
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)
