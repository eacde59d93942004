# Per adapted matrix: A is r x d_in, B is d_out x r, so r (d_in + d_out) = 8 * 1536 = 12,288.
# Two matrices a layer (q_proj, v_proj), 12 layers.
ANSWER = 12 * 2 * 8 * (768 + 768)
