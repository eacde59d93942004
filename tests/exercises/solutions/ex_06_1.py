# GPT's decoder and the 2017 decoder's self-attention; never the encoders or cross-attention.
ANSWER = {2, 4}
