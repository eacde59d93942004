# Rows 0..5 see keys j <= i and j < 4: 1 + 2 + 3 + 4 + 4 + 4.
ANSWER = 18
