def pre_norm_block(x, attn, mlp, attn_norm, mlp_norm):
    h = x + attn(attn_norm(x))
    return h + mlp(mlp_norm(h))
