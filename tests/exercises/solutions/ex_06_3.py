from torch.nn import functional as F


def label_smoothing_targets(targets, vocab_size, eps):
    return (1 - eps) * F.one_hot(targets, vocab_size).float() + eps / vocab_size
