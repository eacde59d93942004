"""The decoding fast paths against their plain references: decoding with fused q/k/v projections,
and GPT's position embeddings read without an index. (The fused projections themselves are tested
in tests/attention/test_fused.py, the pre-norm inference path in tests/blocks/test_block.py.)"""

from __future__ import annotations

import pytest
import torch

from qkv.attention.fused import fused_projections
from qkv.generate.cached import CachedDecoder
from qkv.models.common import attention_modules
from qkv.models.gpt import GPT, PRESETS
from tests.conftest import ATOL
from tests.generate.conftest import DECODER_ONLY, tiny, vocab


def test_gpt_positions_without_index_equal_the_checked_lookup() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        explicit = model(ids, position_ids=torch.arange(7)).logits  # through pos_emb's checks
        masked = model(ids, torch.ones(2, 7, dtype=torch.long)).logits  # built from a mask
        sliced = model(ids).logits  # a slice of the table
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:5], cache=cache).logits  # past = 4: row 4 of the table
    torch.testing.assert_close(sliced, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(masked, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(step[:, 0], explicit[:, 4], atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoding_with_fused_projections_equals_plain_decoding(family: str) -> None:
    model = tiny(family)
    prompt = torch.randint(3, vocab(model), (2, 5))
    tokens = torch.randint(3, vocab(model), (2, 4))

    def logits_per_step(fused: bool) -> torch.Tensor:
        runner = CachedDecoder(model, prompt, None, max_new_tokens=5, flat=fused)
        with torch.inference_mode(), fused_projections(attention_modules(model) if fused else []):
            steps = [runner.prefill()] + [runner.step(tokens[:, i]) for i in range(4)]
        return torch.stack(steps, dim=1).clone()  # (B, 5, V)

    torch.testing.assert_close(
        logits_per_step(True), logits_per_step(False), atol=ATOL[torch.float32], rtol=0
    )
