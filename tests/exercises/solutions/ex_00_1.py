# n x n scores of 4 bytes: 4096 * 4096 * 4 bytes = 2^12 * 2^12 * 2^2 = 2^26 bytes = 2^6 MiB.
ANSWER = 4096 * 4096 * 4 / 2**20
