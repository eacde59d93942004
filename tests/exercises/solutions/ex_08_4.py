import torch


def cached_attention(q, k_new, v_new, k_cache, v_cache):
    k = torch.cat([k_cache, k_new], dim=-2)  # (B, H, P + T, E)
    v = torch.cat([v_cache, v_new], dim=-2)
    t, s = q.shape[-2], k.shape[-2]
    query_pos = torch.arange(s - t, s)[:, None]  # new token i is at position P + i
    mask = torch.arange(s)[None, :] <= query_pos  # (T, S)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return weights @ v, k, v
