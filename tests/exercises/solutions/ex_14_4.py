def recall_at_k(indices, relevant, k):
    hit = relevant.gather(1, indices[:, :k])  # (Q, k): does the passage at rank i answer?
    return hit.any(dim=1).float().mean().item()
