# The head is a (V, D) matrix; tied, it is the embedding table itself: V x D fewer parameters.
ANSWER = 32_000 * 4_096  # 131,072,000
