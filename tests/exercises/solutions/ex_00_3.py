import torch


def rnn_states(x, w_h, w_x):
    h = torch.zeros(w_h.shape[0])  # (D,): h_0
    states = []
    for x_t in x:  # one step after another: step t needs h_{t-1}
        h = torch.tanh(h @ w_h + x_t @ w_x)  # (D,)
        states.append(h)
    return torch.stack(states)  # (T, D)
