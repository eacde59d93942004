# Running mass before each token: 0, 0.4, 0.65, 0.85 -> the first three start below 0.7.
ANSWER = 3
