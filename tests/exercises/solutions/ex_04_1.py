# Column 1 is the cosine of frequency i = 0: cos(2 / 10000^0) = cos(2).
ANSWER = -0.416
