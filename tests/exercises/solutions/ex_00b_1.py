# "abracadabra" reads the rows of a, b, r, c, d: eleven lookups, five different rows.
ANSWER = len(set("abracadabra"))
