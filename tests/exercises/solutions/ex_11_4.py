RENAMED = {
    "ln_1": "attn_norm",
    "attn.c_proj": "self_attn.out_proj",
    "ln_2": "mlp_norm",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def gpt2_to_qkv(tensors, n_layers):
    hf = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    out = {"tok_emb.weight": hf["wte.weight"], "pos_emb.emb.weight": hf["wpe.weight"]}
    for i in range(n_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        weights = hf[src + "attn.c_attn.weight"].T.chunk(3, dim=0)  # 3 x (D, D), (out, in)
        biases = hf[src + "attn.c_attn.bias"].chunk(3)
        for proj, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            out[f"{dst}self_attn.{proj}.weight"] = w
            out[f"{dst}self_attn.{proj}.bias"] = b
        for theirs, ours in RENAMED.items():
            w = hf[f"{src}{theirs}.weight"]
            out[f"{dst}{ours}.weight"] = w if theirs.startswith("ln") else w.T
            out[f"{dst}{ours}.bias"] = hf[f"{src}{theirs}.bias"]
    out["final_norm.weight"] = hf["ln_f.weight"]
    out["final_norm.bias"] = hf["ln_f.bias"]
    out["lm_head.weight"] = out["tok_emb.weight"]  # tied: the same matrix
    return out
