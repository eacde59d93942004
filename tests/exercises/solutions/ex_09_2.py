# Per token: 2 (key and value) x 80 layers x 8 kv heads x 128 x 2 bytes = 327,680 bytes.
per_token = 2 * 80 * 8 * 128 * 2
ANSWER = 4 * 32_768 * per_token / 2**30  # GiB
