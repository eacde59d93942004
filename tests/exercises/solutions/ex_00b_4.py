def tied_logits(h, table):
    return h @ table.T  # (B, T, V): the score of piece v is h · table[v]
