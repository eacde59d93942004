# The largest magnitude in the row is |-1.27| = 1.27, so the step is s = 1.27 / 127 = 0.01,
# and 1.004 / 0.01 = 100.4 rounds to the level 100 (which stands for 1.00).
ANSWER = 100
