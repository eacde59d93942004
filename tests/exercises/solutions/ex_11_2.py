LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.o_proj": "self_attn.out_proj",
}
TOP = {"embed_tokens": "tok_emb", "norm": "final_norm"}


def qkv_name(hf_name):
    if not hf_name.startswith("model."):
        return hf_name  # lm_head.weight is lm_head.weight
    name = hf_name.removeprefix("model.")
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, _, param = rest.rpartition(".")
        return f"layers.{i}.{LAYER.get(module, module)}.{param}"
    module, _, param = name.rpartition(".")
    return f"{TOP[module]}.{param}"
