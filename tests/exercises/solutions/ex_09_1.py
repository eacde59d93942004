import math

# After block 1: m = 2, l = e^-1 + e^0. Block 2 raises the maximum to 4: alpha = e^(2 - 4).
alpha = math.exp(2 - 4)
l_first = math.exp(1 - 2) + math.exp(2 - 2)
ANSWER = alpha * l_first + math.exp(4 - 4) + math.exp(0 - 4)  # 1.203
