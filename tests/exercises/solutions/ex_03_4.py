def repeat_kv(x, n_rep):
    return x.repeat_interleave(n_rep, dim=1)  # heads 0 1 -> 0 0 1 1
