import math

# p = (350 - 100) / (1100 - 100) = 0.25; cosine factor (1 + cos(pi / 4)) / 2 = 0.8536
ANSWER = 3e-4 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
