import math

ANSWER = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.040 nats
