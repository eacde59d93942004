# Token embedding V·D = 38,597,152 and positions 1024·D = 786,432 (the head is the embedding).
# Each layer: two LayerNorms 2·2D; c_attn D·3D + 3D; c_proj D·D + D; c_fc D·F + F;
# its c_proj F·D + D: 7,087,872 a layer, 85,054,464 for 12. The final LayerNorm: 2D.
ANSWER = 124_439_808
