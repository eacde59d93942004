# q.k1 = 2 + 2 = 4 and q.k2 = 1; times 1/sqrt(4): 2 and 0.5.
# w1 = e^2 / (e^2 + e^0.5) = 1 / (1 + e^-1.5) = 0.8176
ANSWER = 0.818
