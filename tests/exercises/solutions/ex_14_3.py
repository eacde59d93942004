def top_k(queries, passages, k):
    q = queries / queries.norm(dim=-1, keepdim=True)  # (Q, D), unit length
    p = passages / passages.norm(dim=-1, keepdim=True)  # (N, D)
    return (q @ p.T).topk(k, dim=-1)  # (scores, indices), both (Q, k), best first
