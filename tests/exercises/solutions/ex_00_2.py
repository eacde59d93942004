import math

# W = U = I, so e_j = v·tanh(s + h_j) = the sum of tanh over the entries of s + h_j:
#   s + h_1 = (2, 0): e_1 = tanh 2 = 0.964
#   s + h_2 = (0, 0): e_2 = 0
#   s + h_3 = (1, 1): e_3 = 2 tanh 1 = 1.523
e = [math.tanh(2.0), 0.0, 2 * math.tanh(1.0)]
ANSWER = math.exp(e[2]) / sum(math.exp(x) for x in e)  # 0.559
