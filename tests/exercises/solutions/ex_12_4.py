import torch


def distillation_loss(student_logits, teacher_logits, targets, temperature):
    v = student_logits.shape[-1]
    keep = targets.reshape(-1) != -100
    student = student_logits.reshape(-1, v)[keep] / temperature  # (N, V)
    teacher = teacher_logits.reshape(-1, v)[keep] / temperature
    log_p_s = torch.log_softmax(student, dim=-1)
    log_p_t = torch.log_softmax(teacher, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # sum of KL(p_t || p_s) over targets
    return temperature**2 * kl
