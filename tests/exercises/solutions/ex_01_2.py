# Var(q.k) = d_k = 256, so the standard deviation is sqrt(256).
ANSWER = 16
