# head_dim = 4096 / 32 = 128; per token: 2 (k and v) x 32 layers x 8 kv heads x 128 x 4 bytes.
ANSWER = 2 * 32 * 8 * 128 * 4
