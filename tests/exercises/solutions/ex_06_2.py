# (1 - 0.1) on the right token, plus 0.1 / 5 that the uniform part gives every token.
ANSWER = 0.92
