import torch


def served(experts, n_experts, capacity):
    n, k = experts.shape
    out = torch.zeros(n, k, dtype=torch.bool)
    taken = [0] * n_experts  # choices each expert has served so far
    for rank in range(k):  # every first choice, then every second choice, ...
        for token in range(n):  # ... each in order of position
            e = int(experts[token, rank])
            if capacity is None or taken[e] < capacity:
                out[token, rank] = True
                taken[e] += 1
    return out
