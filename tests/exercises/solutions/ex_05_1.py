# mean 3, deviations (-2, -1, 0, 3), variance (4 + 1 + 0 + 9) / 4 = 3.5; 3 / sqrt(3.5).
ANSWER = 1.604
