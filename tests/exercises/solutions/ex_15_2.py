import torch


def bigram_counts(ids, vocab_size):
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    for current, following in zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True):
        counts[current, following] += 1
    return counts
