def split_c_attn(weight):
    d = weight.shape[0]
    w_q, w_k, w_v = weight.split(d, dim=1)  # (D, D) each, Conv1D's (in, out)
    return w_q.T, w_k.T, w_v.T  # nn.Linear's (out, in)
