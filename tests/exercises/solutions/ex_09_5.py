import torch


def causal_linear_attention(phi_q, phi_k, v):
    # S_t = sum_(s<=t) phi(k_s) v_s^T and z_t = sum_(s<=t) phi(k_s), as prefix sums over t.
    kv = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # (..., T, M, Ev)
    z = torch.cumsum(phi_k, dim=-2)  # (..., T, M)
    num = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)  # (..., T, Ev): phi(q_t)^T S_t
    den = (phi_q * z).sum(dim=-1, keepdim=True)  # (..., T, 1): phi(q_t)^T z_t
    return num / den
