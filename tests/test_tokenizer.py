"""Tests for biomedgpt.tokenizer and the biomedgpt-tokenizer CLI (real sentencepiece/tokenizers, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from biomedgpt.cli.tokenizer import main as cli_main
from biomedgpt.tokenizer import BiomedGPTTokenizer, load_default_tokenizer, train_sentencepiece

TRICKY = [
    " what does the image describe?",
    "what organ is shown?",
    "  two leading spaces",
    "trailing space ",
    "double  space and   triple",
    " ",
    "",
    "tumor size 12.5 µm at 37 °C (±0.2)",
    "β-blocker vs α-blocker: ≥ 3 doses",
    "emoji 😀🩻 and CJK 肺炎 and ünïcödé",
    "0123456789 3.14159 -42 1e-6",
    "punctuation!?.,;:'\"()[]{}<>/\\|@#$%^&*_+=~`",
    "<s> literal </s> <mask> <bin_3> <code_5>",
    "tab\tand\nnewline",
]

SENTENCES = [
    "is there a fracture?",
    "what organ is shown?",
    "the liver is normal in size.",
    "chest x-ray showing a small pleural effusion in the left lower lobe.",
    "no evidence of pneumothorax or consolidation.",
    "what modality is used to take this image?",
    "the patient denies chest pain and shortness of breath.",
    "biopsy of the colon reveals adenocarcinoma.",
    "yes",
    "no",
    "is the heart enlarged?",
    "there is a fracture of the left femur.",
]


@pytest.fixture(scope="module")
def spm_tok() -> BiomedGPTTokenizer:
    return load_default_tokenizer()


# ------------------------------------------------------------------------------------------ SentencePiece


@pytest.mark.parametrize("text", TRICKY)
def test_spm_exact_round_trip(spm_tok: BiomedGPTTokenizer, text: str) -> None:
    ids = spm_tok.encode(text)
    assert all(4 <= i < spm_tok.mask_id for i in ids), "text must only produce text-token ids"
    assert spm_tok.decode(ids) == text


def test_spm_layout(spm_tok: BiomedGPTTokenizer) -> None:
    t = spm_tok
    assert (t.bos_id, t.pad_id, t.eos_id, t.unk_id) == (0, 1, 2, 3)
    assert t.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert t.mask_id == 4 + t.num_text_tokens
    assert t.code_offset == t.mask_id + 1 and t.code_id(0) == t.code_offset and t.code_id(8191) == t.bin_offset - 1
    assert t.bin_offset == t.code_offset + 8192 and t.bin_id(999) == t.vocab_size - 1
    assert t.vocab_size == len(t) == 4 + t.num_text_tokens + 1 + 8192 + 1000
    assert t.convert_ids_to_tokens([t.mask_id, t.code_id(7), t.bin_id(42)]) == [
        "<mask>",
        "<code_7>",
        "<bin_42>",
    ]
    assert t.random_replacement_range == (4, t.mask_id + 1)
    with pytest.raises(ValueError):
        t.code_id(8192)
    with pytest.raises(ValueError):
        t.bin_id(-1)
    # The shipped model is small and its vocabulary is the advertised size.
    assert t.kind == "sentencepiece" and t.num_text_tokens == 3000 - 4
    assert (Path(__file__).parents[1] / "biomedgpt/assets/tokenizer/spm.model").stat().st_size < 500_000


def test_spm_learned_biomedical_words(spm_tok: BiomedGPTTokenizer) -> None:
    # Trained with a leading space per line, so BiomedGPT-style prompts become whole "▁word" pieces.
    toks = spm_tok.convert_ids_to_tokens(spm_tok.encode(" what does the image describe?"))
    assert toks == ["▁what", "▁does", "▁the", "▁image", "▁describe", "?"]
    assert "▁fracture" in spm_tok.convert_ids_to_tokens(spm_tok.encode(" is there a fracture?"))


def test_encode_symbols_without_bpe(spm_tok: BiomedGPTTokenizer) -> None:
    t = spm_tok
    assert t.encode("<bin_3> <bin_900>", use_bpe=False) == [t.bin_id(3), t.bin_id(900)]
    assert t.encode(" <code_5>\t<mask> ", use_bpe=False) == [t.code_id(5), t.mask_id]
    assert t.decode(t.encode("<bin_3> <bin_900>", use_bpe=False)) == "<bin_3> <bin_900>"
    with pytest.raises(ValueError, match="<bin_1000>"):
        t.encode("<bin_1> <bin_1000>", use_bpe=False)


def test_decode_mixed_and_special(spm_tok: BiomedGPTTokenizer) -> None:
    t = spm_tok
    boxes = [t.bin_id(k) for k in (10, 20, 300, 400)]
    ids = [t.bos_id, *boxes, *t.encode(" left kidney"), t.eos_id, t.pad_id, t.pad_id]
    assert t.decode(ids) == "<bin_10> <bin_20> <bin_300> <bin_400> left kidney"
    assert t.decode(ids, skip_special_tokens=False).startswith("<s> <bin_10>")
    assert t.decode(ids, skip_special_tokens=False).endswith(" left kidney </s> <pad> <pad>")
    assert t.decode(t.encode(" region:") + [t.bin_id(1)] + t.encode("cat")) == " region: <bin_1> cat"
    assert t.decode(np.array([t.mask_id, *t.encode(" liver")])) == "<mask> liver"
    assert t.decode([*t.encode(" a"), t.unk_id, *t.encode(" b")]) == " a<unk> b"
    with pytest.raises(ValueError):
        t.decode([t.vocab_size])


def test_spm_word_starts(spm_tok: BiomedGPTTokenizer) -> None:
    t = spm_tok
    ids = t.encode(" is there a fracture? no")
    toks = t.convert_ids_to_tokens(ids)
    expected = [tok.startswith("▁") for tok in toks]
    assert [t.is_beginning_of_word(i) for i in ids] == expected
    assert sum(expected) == 5  # one start per word
    specials = [0, 1, 2, 3, t.mask_id, t.code_id(0), t.code_id(8191), t.bin_id(0), t.bin_id(999)]
    assert all(t.is_beginning_of_word(i) for i in specials)
    mask = t.word_start_mask(np.array([ids, ids]))
    assert mask.shape == (2, len(ids)) and mask.dtype == bool
    assert mask[1].tolist() == expected


def test_encode_batch_padding(spm_tok: BiomedGPTTokenizer) -> None:
    t = spm_tok
    texts = [" is there a fracture?", " yes"]
    rows = t.encode_batch(texts)
    a, b = t.encode(texts[0]), t.encode(texts[1])
    assert rows[0] == [0, *a, 2]
    assert rows[1] == [0, *b, 2] + [1] * (len(a) - len(b))
    assert t(" yes") == [0, *b, 2]
    trunc = t.encode_batch(texts, max_length=4, pad_to=6, return_tensors="np")
    assert trunc.shape == (2, 6)
    assert trunc[0].tolist() == [0, *a[:2], 2, 1, 1]
    assert t.encode_batch(["<bin_1> <bin_2>"], add_bos_eos=False, use_bpe=False) == [[t.bin_id(1), t.bin_id(2)]]
    torch = pytest.importorskip("torch")
    pt = t.encode_batch(texts, return_tensors="pt")
    assert pt.dtype == torch.long and pt.tolist() == rows
    assert t.batch_decode(pt) == texts
    with pytest.raises(ValueError, match="pad_to"):
        t.encode_batch(texts, pad_to=2)


def test_save_and_load_round_trip(spm_tok: BiomedGPTTokenizer, tmp_path: Path) -> None:
    spm_tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok/tokenizer_config.json").read_text())
    assert cfg["kind"] == "sentencepiece" and cfg["vocab_size"] == spm_tok.vocab_size
    again = BiomedGPTTokenizer.from_pretrained(tmp_path / "tok")
    for text in TRICKY:
        assert again.encode(text) == spm_tok.encode(text)
    assert again.vocab_size == spm_tok.vocab_size and again.mask_id == spm_tok.mask_id
    assert BiomedGPTTokenizer.from_sentencepiece(tmp_path / "tok/spm.model").encode(" liver") == spm_tok.encode(
        " liver"
    )


def test_from_sentencepiece_rejects_foreign_layout(tmp_path: Path) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES * 5) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=60, minloglevel=2
    )  # default layout: <unk>=0, <s>=1, </s>=2, no pad
    with pytest.raises(ValueError, match="<s>"):
        BiomedGPTTokenizer.from_sentencepiece(tmp_path / "plain.model")


# ------------------------------------------------------------------------------------------ training + CLI


def _tiny_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    organs = ["liver", "lung", "kidney", "spleen", "heart", "brain", "colon", "femur"]
    finds = ["fracture", "nodule", "effusion", "mass", "cyst", "edema", "tumor", "lesion"]
    lines = [
        f"{rng.choice(['small', 'large', 'mild'])} {rng.choice(finds)} in the {rng.choice(organs)} "
        f"measuring {rng.integers(1, 99)} mm."
        for _ in range(300)
    ]
    path.write_text("\n".join(lines + SENTENCES) + "\n", encoding="utf-8")
    return path


def test_cli_train_then_encode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _tiny_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "tok"
    assert cli_main(["train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    tok = BiomedGPTTokenizer.from_pretrained(out)
    assert tok.kind == "sentencepiece" and tok.num_text_tokens == 396 and tok.mask_id == 400
    for text in [" small fracture in the liver measuring 42 mm.", *TRICKY]:
        assert tok.decode(tok.encode(text)) == text
    assert "▁liver" in tok.convert_ids_to_tokens(tok.encode(" liver"))

    capsys.readouterr()
    assert cli_main(["encode", "--tokenizer", str(out), "--json", " the liver"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ids"] == tok.encode(" the liver")
    assert printed["tokens"] == tok.convert_ids_to_tokens(printed["ids"])
    assert cli_main(["info", "--tokenizer", str(out)]) == 0
    info = capsys.readouterr().out
    assert "<mask>" in info and "400" in info and "<bin_0>=8593" in info


def test_train_from_tsv_column(tmp_path: Path) -> None:
    tsv = tmp_path / "vqa.tsv"
    rows = [f"{i}\timg{i}.jpg\t{q}\tyes" for i, q in enumerate(SENTENCES * 30)]
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tsv"):
        train_sentencepiece([tsv], tmp_path / "x", 400)
    tok = train_sentencepiece([tsv], tmp_path / "tok", 400, tsv_column=2)
    pieces = set(tok.convert_ids_to_tokens(list(range(4, tok.mask_id))))
    assert "▁fracture" in pieces  # learned from column 2 ...
    assert not any("jpg" in p for p in pieces)  # ... and not from the image-name column
    with pytest.raises(ValueError, match="columns"):
        train_sentencepiece([tsv], tmp_path / "y", 400, tsv_column=9)


def test_train_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_sentencepiece([missing], tmp_path / "out", 300)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        train_sentencepiece([empty], tmp_path / "out", 300)
    rc = cli_main(["train", "--input", str(missing), "--vocab-size", "300", "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err


def test_console_script_runs_as_module() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "biomedgpt.cli.tokenizer", "encode", "--no-bpe", "<bin_3> <bin_900>"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    tok = load_default_tokenizer()
    assert res.stdout.splitlines()[0].split()[1:] == [str(tok.bin_id(3)), str(tok.bin_id(900))]


# ------------------------------------------------------------------------------------------ GPT-2 BPE


def _write_gpt2_files(directory: Path, drop_token: str | None = None) -> dict:
    """Original-format encoder.json / vocab.bpe / dict.txt from a tiny byte-level BPE trained here."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    corpus = [" " + s for s in SENTENCES] * 20
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2, show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    encoder: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    # fairseq orders dict.txt by corpus frequency, so line order differs from GPT-2 id order.
    counts = Counter(i for s in corpus for i in bpe.encode(s).ids)
    order = sorted(encoder.values(), key=lambda g: (-counts[g], -g))
    if drop_token is not None:
        order.remove(encoder[drop_token])
    lines = [f"{g} {counts[g]}" for g in order] + [f"madeupword000{k} 0" for k in range(3)]
    (directory / "dict.txt").write_text("\n".join(lines) + "\n")
    return {"encoder": encoder, "order": order, "bpe": bpe}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[BiomedGPTTokenizer, dict, Path]:
    d = tmp_path_factory.mktemp("gpt2")
    info = _write_gpt2_files(d)
    return BiomedGPTTokenizer.from_gpt2_bpe(d / "encoder.json", d / "vocab.bpe", d / "dict.txt"), info, d


def test_gpt2_ids_follow_dict_order(gpt2: tuple[BiomedGPTTokenizer, dict, Path]) -> None:
    tok, info, _ = gpt2
    order, encoder, bpe = info["order"], info["encoder"], info["bpe"]
    assert order != sorted(order), "fixture must exercise a dict order different from GPT-2 id order"
    line_of = {g: i for i, g in enumerate(order)}
    for s in SENTENCES:
        gpt2_ids = bpe.encode(" " + s).ids
        assert tok.encode(" " + s) == [4 + line_of[g] for g in gpt2_ids]
    inv = {i: t for t, i in encoder.items()}
    assert tok.convert_ids_to_tokens(4) == inv[order[0]]
    assert tok.convert_ids_to_tokens(4 + len(order)) == "madeupword0000"
    assert tok.num_text_tokens == len(order) + 3
    assert tok.mask_id == 4 + len(order) + 3
    assert tok.code_id(0) == tok.mask_id + 1 and tok.bin_id(0) == tok.mask_id + 1 + 8192
    assert tok.vocab_size == tok.bin_id(999) + 1
    assert tok.random_replacement_range == (4, tok.mask_id + 1)


def test_gpt2_matches_reference_implementation(gpt2: tuple[BiomedGPTTokenizer, dict, Path]) -> None:
    # transformers' slow GPT2Tokenizer is a pure-Python port of OpenAI's encoder.py.
    from transformers import GPT2Tokenizer

    tok, info, d = gpt2
    ref = GPT2Tokenizer(str(d / "encoder.json"), str(d / "vocab.bpe"))
    line_of = {g: i for i, g in enumerate(info["order"])}
    for text in TRICKY + [" " + s for s in SENTENCES]:
        expected = [4 + line_of[g] for g in ref.encode(text)]
        assert tok.encode(text) == expected, text


@pytest.mark.parametrize("text", TRICKY + [" is there a fracture of the femur?"])
def test_gpt2_round_trip(gpt2: tuple[BiomedGPTTokenizer, dict, Path], text: str) -> None:
    tok = gpt2[0]
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_gpt2_missing_id_is_unk(tmp_path: Path) -> None:
    info = _write_gpt2_files(tmp_path, drop_token="Ġfracture")
    tok = BiomedGPTTokenizer.from_gpt2_bpe(tmp_path)  # directory form
    ids = tok.encode(" is there a fracture?")
    assert ids.count(tok.unk_id) == 1
    assert tok.decode(ids) == " is there a<unk>?"  # <unk> replaced "Ġfracture", space included
    assert tok.num_text_tokens == len(info["encoder"]) - 1 + 3


def test_gpt2_word_starts_and_symbols(gpt2: tuple[BiomedGPTTokenizer, dict, Path]) -> None:
    tok = gpt2[0]
    ids = tok.encode(" what organ is shown? yes")
    toks = tok.convert_ids_to_tokens(ids)
    assert [tok.is_beginning_of_word(i) for i in ids] == [t.startswith("Ġ") for t in toks]
    assert tok.word_start_mask(ids).sum() == 5
    madeup = tok.convert_tokens_to_ids("madeupword0001")
    for i in [0, 1, 2, 3, madeup, tok.mask_id, tok.code_id(3), tok.bin_id(500)]:
        assert tok.is_beginning_of_word(i)
    assert tok.encode("<bin_3> <bin_900>", use_bpe=False) == [tok.bin_id(3), tok.bin_id(900)]
    assert tok.decode([tok.bin_id(1), *tok.encode(" liver")]) == "<bin_1> liver"


def test_gpt2_save_and_load(gpt2: tuple[BiomedGPTTokenizer, dict, Path], tmp_path: Path) -> None:
    tok = gpt2[0]
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["kind"] == "gpt2_bpe" and cfg["mask_id"] == tok.mask_id
    again = BiomedGPTTokenizer.from_pretrained(tmp_path)
    assert again.kind == "gpt2_bpe" and again.vocab_size == tok.vocab_size
    for text in TRICKY:
        assert again.encode(text) == tok.encode(text)


def test_gpt2_original_layout_size(gpt2: tuple[BiomedGPTTokenizer, dict, Path], tmp_path: Path) -> None:
    # Same shape as BiomedGPT's utils/BPE/dict.txt: 50,257 GPT-2 ids + 3 madeupwords = 50,260 lines.
    _, _, d = gpt2
    lines = [f"{g} {50257 - g}" for g in range(50257)] + [f"madeupword000{k} 0" for k in range(3)]
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n")
    tok = BiomedGPTTokenizer.from_gpt2_bpe(d / "encoder.json", d / "vocab.bpe", tmp_path / "dict.txt")
    assert tok.num_text_tokens == 50260
    assert tok.vocab_size == len(tok) == 59457
    assert (tok.mask_id, tok.code_id(0), tok.bin_id(0)) == (50264, 50265, 58457)
    assert (tok.code_id(8191), tok.bin_id(999)) == (58456, 59456)
    assert tok.random_replacement_range == (4, 50265)
    assert tok.decode(tok.encode(" is there a fracture?")) == " is there a fracture?"


def test_gpt2_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        BiomedGPTTokenizer.from_gpt2_bpe(tmp_path)
    with pytest.raises(FileNotFoundError):
        BiomedGPTTokenizer.from_pretrained(tmp_path / "nothing")
