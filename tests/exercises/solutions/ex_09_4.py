import torch


def online_attention(q, k, v, block_size):
    scale = q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1], float("-inf"))  # (..., T): running maximum
    total = torch.zeros(q.shape[:-1])  # (..., T): running sum of exp(s - m), the page's l
    acc = torch.zeros(*q.shape[:-1], v.shape[-1])  # (..., T, Ev): running weighted sum
    for start in range(0, k.shape[-2], block_size):
        k_j = k[..., start : start + block_size, :]  # (..., block, E)
        v_j = v[..., start : start + block_size, :]  # (..., block, Ev)
        s_j = (q @ k_j.transpose(-2, -1)) * scale  # (..., T, block)
        new_m = torch.maximum(m, s_j.amax(dim=-1))  # (..., T)
        alpha = torch.exp(m - new_m)  # rescales what was summed under the old maximum
        p = torch.exp(s_j - new_m[..., None])  # (..., T, block)
        total = alpha * total + p.sum(dim=-1)
        acc = alpha[..., None] * acc + p @ v_j
        m = new_m
    return acc / total[..., None], m + torch.log(total)
