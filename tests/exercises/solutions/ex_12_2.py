def lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    scaling = alpha / lora_A.shape[0]  # alpha / r
    return x @ weight.T + bias + scaling * (x @ lora_A.T @ lora_B.T)
