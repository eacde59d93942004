def merge_heads(x):
    b, h, t, e = x.shape
    return x.transpose(1, 2).reshape(b, t, h * e)  # (B, T, H*E)
