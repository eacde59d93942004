import torch


def route(logits, k):
    top_logits, experts = logits.topk(k, dim=-1)  # (N, k) each, largest first
    gates = torch.softmax(top_logits, dim=-1)  # over the k chosen logits only
    return gates, experts
