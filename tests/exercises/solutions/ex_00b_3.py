import math


def embed(ids, table, pos_table):
    d = table.shape[-1]
    x = table[ids] * math.sqrt(d)  # (B, T, D): a lookup reads rows, then the 2017 scale
    return x + pos_table[: ids.shape[-1]]  # (B, T, D): plus the position of each token
