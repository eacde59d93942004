import torch


def _padding(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def seq2seq_masks(src_lengths, tgt_lengths):
    s, t = max(src_lengths), max(tgt_lengths)
    src = _padding(src_lengths, s)  # (B, 1, 1, S)
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # (T, T)
    return src, causal & _padding(tgt_lengths, t), src
