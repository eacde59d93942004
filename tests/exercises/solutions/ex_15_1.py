import math

# Probability 1/103 for whatever comes next: a loss of -ln(1/103) = ln 103 nats.
ANSWER = math.log(103)
