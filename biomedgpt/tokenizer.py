"""Unified BiomedGPT/OFA tokenizer: one id layout, two interchangeable text backends.

Id layout (the dictionary BiomedGPT tasks/ofa_task.py builds in OFATask.setup_task; identical for both backends)::

    0 <s> (bos) | 1 <pad> | 2 </s> (eos) | 3 <unk>
    4 ... 4+T-1            text tokens (T = num_text_tokens)
    4+T                    <mask>
    code_offset + k        <code_k>, k < num_codes (8192)
    bin_offset + k         <bin_k>,  k < num_bins  (1000)

Backends

* ``gpt2_bpe`` -- the original BiomedGPT files ``encoder.json`` + ``vocab.bpe`` + ``dict.txt``. Text is
  split with GPT-2 byte-level BPE; each GPT-2 id is looked up (as a decimal string) in the fairseq
  ``dict.txt`` whose line ``i`` is our id ``4 + i``. With the released files T = 50,260, so ``<mask>`` =
  50264, ``<code_0>`` = 50265, ``<bin_0>`` = 58457 and the vocabulary has 59,457 entries, which is what
  released checkpoints expect.
* ``sentencepiece`` -- a model trained by :func:`train_sentencepiece` whose own ids 0..3 already are
  bos/pad/eos/unk, so its piece ids are used unchanged. Byte fallback, identity normalisation and no dummy
  prefix make ``decode(encode(text)) == text`` for every UTF-8 string, including BiomedGPT's leading spaces.

Whole-word masking (``add_whole_word_mask`` of BiomedGPT data/pretrain_data/unify_dataset.py) needs word starts:
:meth:`BiomedGPTTokenizer.is_beginning_of_word` / :meth:`BiomedGPTTokenizer.word_start_mask` treat GPT-2 tokens
starting with "Ġ" (a space byte), SentencePiece pieces starting with "▁", and every
special/``madeupword``/``<mask>``/code/bin token as word starts, like fairseq.

Shipped model (``biomedgpt/assets/tokenizer/``, loaded by :func:`load_default_tokenizer`): a 3,000-piece BPE
SentencePiece model (12,193 ids with mask/codes/bins) made with ``biomedgpt-tokenizer train --input corpus.txt
--vocab-size 3000 --character-coverage 1.0 --out .`` from ``corpus.txt``: 4,000 synthetic, template-generated
biomedical English lines (radiology/pathology captions, VQA questions and answers, clinical-note snippets,
abstract-style summaries, NLI pairs, MedMNIST class names, numbers with units), produced once by a seeded
generator that is not shipped. It is meant for tests and the demo, not for real training.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BiomedGPTTokenizer",
    "DEFAULT_NUM_BINS",
    "DEFAULT_NUM_CODES",
    "default_tokenizer_dir",
    "load_default_tokenizer",
    "train_sentencepiece",
]

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"
SPECIAL_SYMBOLS = (BOS, PAD, EOS, UNK)
NUM_SPECIAL = len(SPECIAL_SYMBOLS)
DEFAULT_NUM_CODES = 8192
DEFAULT_NUM_BINS = 1000

CONFIG_NAME = "tokenizer_config.json"
SPM_MODEL_NAME = "spm.model"
SPM_VOCAB_NAME = "spm.vocab"
GPT2_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
KIND_SPM = "sentencepiece"
KIND_GPT2 = "gpt2_bpe"

_SPM_WORD_PREFIX = "\u2581"  # "▁"
_GPT2_SPACE = "\u0120"  # "Ġ", the byte-level stand-in for b" "


def default_tokenizer_dir() -> Path:
    """Directory of the small SentencePiece tokenizer shipped as package data."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def load_default_tokenizer() -> BiomedGPTTokenizer:
    """Load the shipped demo/test tokenizer (see module docstring for how it was made)."""
    return BiomedGPTTokenizer.from_pretrained(default_tokenizer_dir())


# ----------------------------------------------------------------------------------------------------------
# Text backends. Both map text <-> "text ids" already in *our* numbering (4 .. 4+T-1, plus 3 for unknown).
# ----------------------------------------------------------------------------------------------------------


class _SentencePieceBackend:
    kind = KIND_SPM

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        expected = {0: BOS, 1: PAD, 2: EOS, 3: UNK}
        for idx, sym in expected.items():
            if self.sp.id_to_piece(idx) != sym:
                raise ValueError(
                    f"SentencePiece model must have {sym!r} at id {idx} "
                    f"(found {self.sp.id_to_piece(idx)!r}); train it with train_sentencepiece() "
                    "so its ids match the BiomedGPT layout"
                )
        n = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(NUM_SPECIAL, n)]
        self.num_text = len(self.pieces)
        self.word_start = np.fromiter(
            (p.startswith(_SPM_WORD_PREFIX) for p in self.pieces), dtype=bool, count=self.num_text
        )
        # A piece that is not a normal/byte piece (e.g. an extra control symbol) cannot be decoded as text.
        self.decodable = np.fromiter(
            (not self.sp.is_control(i) and not self.sp.is_unknown(i) for i in range(NUM_SPECIAL, n)),
            dtype=bool,
            count=self.num_text,
        )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, text_ids: list[int]) -> str:
        return self.sp.decode(text_ids)

    def save(self, directory: Path) -> dict[str, str]:
        (directory / SPM_MODEL_NAME).write_bytes(self.proto)
        with open(directory / SPM_VOCAB_NAME, "w", encoding="utf-8") as f:
            for i in range(self.sp.get_piece_size()):
                f.write(f"{self.sp.id_to_piece(i)}\t{self.sp.get_score(i)}\n")
        return {"model": SPM_MODEL_NAME}


class _GPT2Backend:
    kind = KIND_GPT2

    def __init__(self, encoder_json: bytes, vocab_bpe: bytes, dict_txt: bytes) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.raw = {"encoder.json": encoder_json, "vocab.bpe": vocab_bpe, "dict.txt": dict_txt}
        encoder: dict[str, int] = json.loads(encoder_json.decode("utf-8"))
        merges = _parse_merges(vocab_bpe.decode("utf-8"))
        symbols = _parse_fairseq_dict(dict_txt.decode("utf-8"))
        self.num_text = len(symbols)

        bpe = models.BPE(vocab=encoder, merges=merges)
        tok = Tokenizer(bpe)
        # GPT-2 regex pre-tokenisation on raw bytes; no prefix space (BiomedGPT prompts carry their own).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self.hf = tok

        gpt2_tokens = {i: t for t, i in encoder.items()}
        int_syms = [int(s) for s in symbols if _is_gpt2_id(s)]
        size = max([len(encoder) - 1, *encoder.values(), *int_syms], default=-1) + 1
        # GPT-2 id -> our id (unk when dict.txt lacks it); our text index -> GPT-2 id (-1: not a GPT-2 id).
        self.to_ours = np.full(size, NUM_SPECIAL - 1, dtype=np.int64)  # 3 == <unk>
        self.to_gpt2 = np.full(self.num_text, -1, dtype=np.int64)
        self.pieces: list[str] = []
        word_start = np.ones(self.num_text, dtype=bool)
        for i, sym in enumerate(symbols):
            if _is_gpt2_id(sym):
                g = int(sym)
                self.to_ours[g] = NUM_SPECIAL + i
                self.to_gpt2[i] = g
                piece = gpt2_tokens.get(g)
                if piece is None:  # listed in dict.txt but unknown to encoder.json: keep the raw symbol
                    self.to_gpt2[i] = -1
                    piece = sym
                else:
                    word_start[i] = piece.startswith(_GPT2_SPACE)
                self.pieces.append(piece)
            else:  # madeupword0000 etc.: fairseq counts these as word starts
                self.pieces.append(sym)
        self.word_start = word_start
        self.decodable = self.to_gpt2 >= 0

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return self.to_ours[np.asarray(ids, dtype=np.int64)].tolist() if ids else []

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        out = []
        for enc in self.hf.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids
            out.append(self.to_ours[np.asarray(ids, dtype=np.int64)].tolist() if ids else [])
        return out

    def decode(self, text_ids: list[int]) -> str:
        gpt2 = self.to_gpt2[np.asarray(text_ids, dtype=np.int64) - NUM_SPECIAL].tolist()
        return self.hf.decode(gpt2, skip_special_tokens=False)

    def save(self, directory: Path) -> dict[str, str]:
        for name, data in self.raw.items():
            (directory / name).write_bytes(data)
        return {"encoder_json": "encoder.json", "vocab_bpe": "vocab.bpe", "dict_txt": "dict.txt"}


def _is_gpt2_id(sym: str) -> bool:
    return sym.isascii() and sym.isdigit()


def _parse_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"vocab.bpe line {lineno}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _parse_fairseq_dict(text: str) -> list[str]:
    """Symbols of a fairseq ``dict.txt`` in file order (line i -> index 4+i)."""
    symbols: list[str] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        sym, sep, count = line.rpartition(" ")
        if not sep:
            raise ValueError(f"dict.txt line {lineno}: expected '<symbol> <count>', got {line!r}")
        if count == "#fairseq:overwrite":  # "<sym> <count> #fairseq:overwrite"
            sym, _, count = sym.rpartition(" ")
        if not count.lstrip("-").isdigit():
            raise ValueError(f"dict.txt line {lineno}: count {count!r} is not an integer")
        if sym in seen:
            raise ValueError(f"dict.txt line {lineno}: duplicate symbol {sym!r}")
        seen.add(sym)
        symbols.append(sym)
    if not symbols:
        raise ValueError("dict.txt is empty")
    return symbols


# ----------------------------------------------------------------------------------------------------------


class BiomedGPTTokenizer:
    """Text + ``<mask>`` + VQ-GAN code + location bin vocabulary with the BiomedGPT/OFA id layout.

    Build it with :meth:`from_sentencepiece`, :meth:`from_gpt2_bpe`, :meth:`from_pretrained` or
    :meth:`default`; :func:`train_sentencepiece` trains a new SentencePiece backend.
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(
        self,
        backend: _SentencePieceBackend | _GPT2Backend,
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
    ) -> None:
        if num_codes < 0 or num_bins < 0:
            raise ValueError("num_codes and num_bins must be >= 0")
        self._backend = backend
        self.kind: str = backend.kind
        self.num_text_tokens: int = backend.num_text
        self.num_codes = int(num_codes)
        self.num_bins = int(num_bins)
        self.mask_id: int = NUM_SPECIAL + self.num_text_tokens
        self.code_offset: int = self.mask_id + 1
        self.bin_offset: int = self.code_offset + self.num_codes
        self.vocab_size: int = self.bin_offset + self.num_bins

        tokens = list(SPECIAL_SYMBOLS) + list(backend.pieces) + [MASK]
        tokens += [f"<code_{k}>" for k in range(self.num_codes)]
        tokens += [f"<bin_{k}>" for k in range(self.num_bins)]
        assert len(tokens) == self.vocab_size
        self._tokens = tokens
        self._token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self._token_to_id.setdefault(t, i)

        ws = np.ones(self.vocab_size, dtype=bool)
        ws[NUM_SPECIAL : self.mask_id] = backend.word_start
        self._word_start = ws
        # Ids whose text comes from the backend's decoder; everything else is rendered as its symbol.
        dec = np.zeros(self.vocab_size, dtype=bool)
        dec[NUM_SPECIAL : self.mask_id] = backend.decodable
        self._decodable = dec

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_sentencepiece(
        cls,
        model_path: str | os.PathLike[str],
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
    ) -> BiomedGPTTokenizer:
        """Wrap a SentencePiece ``.model`` whose ids 0..3 are ``<s> <pad> </s> <unk>``."""
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        return cls(_SentencePieceBackend(path.read_bytes()), num_codes=num_codes, num_bins=num_bins)

    @classmethod
    def from_gpt2_bpe(
        cls,
        encoder_json: str | os.PathLike[str],
        vocab_bpe: str | os.PathLike[str] | None = None,
        dict_txt: str | os.PathLike[str] | None = None,
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
    ) -> BiomedGPTTokenizer:
        """Original BiomedGPT GPT-2 BPE + fairseq dictionary: the three files, or one directory with them."""
        if vocab_bpe is None and dict_txt is None:
            d = Path(encoder_json)
            if not d.is_dir():
                raise ValueError(f"{d} is not a directory; pass encoder_json, vocab_bpe and dict_txt")
            paths = [d / name for name in GPT2_FILES]
        elif vocab_bpe is None or dict_txt is None:
            raise ValueError("pass all three of encoder_json, vocab_bpe and dict_txt (or a single directory)")
        else:
            paths = [Path(encoder_json), Path(vocab_bpe), Path(dict_txt)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"GPT-2 BPE file not found: {p}")
        data = [p.read_bytes() for p in paths]
        return cls(_GPT2Backend(*data), num_codes=num_codes, num_bins=num_bins)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> BiomedGPTTokenizer:
        """Load a :meth:`save_pretrained` directory, a bare GPT-2 file directory, or a ``.model`` file."""
        p = Path(path)
        if p.is_file() and p.suffix == ".model":
            return cls.from_sentencepiece(p)
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {p}")
        cfg_path = p / CONFIG_NAME
        if not cfg_path.is_file():
            if all((p / n).is_file() for n in GPT2_FILES):
                return cls.from_gpt2_bpe(p)
            if (p / SPM_MODEL_NAME).is_file():
                return cls.from_sentencepiece(p / SPM_MODEL_NAME)
            raise FileNotFoundError(
                f"{p} has no {CONFIG_NAME}, no {SPM_MODEL_NAME} and not all of {', '.join(GPT2_FILES)}"
            )
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        kind = cfg.get("kind")
        files = cfg.get("files", {})
        kw = {
            "num_codes": int(cfg.get("num_codes", DEFAULT_NUM_CODES)),
            "num_bins": int(cfg.get("num_bins", DEFAULT_NUM_BINS)),
        }
        if kind == KIND_SPM:
            tok = cls.from_sentencepiece(p / files.get("model", SPM_MODEL_NAME), **kw)
        elif kind == KIND_GPT2:
            tok = cls.from_gpt2_bpe(
                p / files.get("encoder_json", "encoder.json"),
                p / files.get("vocab_bpe", "vocab.bpe"),
                p / files.get("dict_txt", "dict.txt"),
                **kw,
            )
        else:
            raise ValueError(f"{cfg_path}: unknown tokenizer kind {kind!r} (expected {KIND_SPM!r} or {KIND_GPT2!r})")
        if "vocab_size" in cfg and int(cfg["vocab_size"]) != tok.vocab_size:
            raise ValueError(
                f"{cfg_path}: vocab_size {cfg['vocab_size']} does not match the backing files ({tok.vocab_size})"
            )
        return tok

    @classmethod
    def default(cls) -> BiomedGPTTokenizer:
        """The small SentencePiece tokenizer shipped with the package (tests, demo)."""
        return cls.from_pretrained(default_tokenizer_dir())

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the backing files and ``tokenizer_config.json``; :meth:`from_pretrained` reads them back."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = self._backend.save(d)
        cfg = {
            "kind": self.kind,
            "files": files,
            "vocab_size": self.vocab_size,
            "num_text_tokens": self.num_text_tokens,
            "num_codes": self.num_codes,
            "num_bins": self.num_bins,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "mask_id": self.mask_id,
            "code_offset": self.code_offset,
            "bin_offset": self.bin_offset,
        }
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return d

    # ---------------------------------------------------------------- layout helpers

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"BiomedGPTTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"num_text_tokens={self.num_text_tokens}, mask_id={self.mask_id}, "
            f"code_offset={self.code_offset}, bin_offset={self.bin_offset})"
        )

    def code_id(self, k: int) -> int:
        """Id of ``<code_k>`` (VQ-GAN codebook entry k)."""
        if not 0 <= k < self.num_codes:
            raise ValueError(f"code index {k} out of range [0, {self.num_codes})")
        return self.code_offset + int(k)

    def bin_id(self, k: int) -> int:
        """Id of ``<bin_k>`` (quantised coordinate k)."""
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin index {k} out of range [0, {self.num_bins})")
        return self.bin_offset + int(k)

    @property
    def random_replacement_range(self) -> tuple[int, int]:
        """Half-open id range for random-token noise: text tokens plus ``<mask>``, never codes/bins.

        As the noise of BiomedGPT data/pretrain_data/unify_dataset.py and data/nlg_data/summary_dataset.py.
        """
        return NUM_SPECIAL, self.mask_id + 1

    def is_beginning_of_word(self, token_id: int) -> bool:
        """True if the token starts a word (for BART whole-word masking)."""
        return bool(self._word_start[self._check_id(token_id)])

    def word_start_mask(self, ids: Sequence[int] | np.ndarray | Any) -> np.ndarray:
        """Vectorised :meth:`is_beginning_of_word`: bool array shaped like ``ids`` (list, ndarray, tensor)."""
        arr = _as_int_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return self._word_start[arr]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Token strings (SentencePiece pieces / GPT-2 byte-level tokens / special symbols)."""
        if isinstance(ids, (int, np.integer)):
            return self._tokens[self._check_id(ids)]
        return [self._tokens[self._check_id(i)] for i in _as_int_array(ids).reshape(-1).tolist()]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Inverse of :meth:`convert_ids_to_tokens`; unknown token strings map to ``unk_id``."""
        if isinstance(tokens, str):
            return self._token_to_id.get(tokens, self.unk_id)
        return [self._token_to_id.get(t, self.unk_id) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id (first id wins for duplicate strings)."""
        return dict(self._token_to_id)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, use_bpe: bool = True) -> list[int]:
        """Token ids of ``text`` without bos/eos.

        ``use_bpe=False`` splits on whitespace and looks each piece up as a vocabulary symbol, as BiomedGPT
        does for ``"<bin_12> <bin_40> ..."`` grounding targets and ``<code_k>`` sequences.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        if use_bpe:
            return list(self._backend.encode(text))
        ids = []
        for sym in text.split():
            i = self._token_to_id.get(sym)
            if i is None:
                raise ValueError(f"unknown vocabulary symbol {sym!r} (use_bpe=False looks symbols up verbatim)")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; codes, bins and ``<mask>`` appear as space-separated symbols, ``<unk>`` inline.

        With ``skip_special_tokens`` bos/pad/eos are dropped (otherwise shown like codes/bins).
        """
        flat = _as_int_array(ids).reshape(-1).tolist()
        out: list[str] = []
        prev_symbol = False
        run: list[int] = []

        def flush() -> None:
            nonlocal prev_symbol
            if not run:
                return
            text = self._backend.decode(run)
            run.clear()
            if prev_symbol and text and not text[0].isspace():
                out.append(" ")
            out.append(text)
            prev_symbol = False

        skip = (self.bos_id, self.pad_id, self.eos_id) if skip_special_tokens else ()
        for i in flat:
            self._check_id(i)
            if self._decodable[i]:
                run.append(i)
                continue
            flush()
            if i in skip:
                continue
            if i == self.unk_id:  # stands for a piece of text (with its own spacing): render inline
                out.append(self._tokens[i])
                prev_symbol = False
                continue
            if out and not out[-1][-1:].isspace():
                out.append(" ")
            out.append(self._tokens[i])
            prev_symbol = True
        flush()
        return "".join(out)

    def batch_decode(self, batch: Iterable[Iterable[int]] | Any, skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` for each row of a batch (lists, 2-D array or tensor)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos_eos: bool = True,
        max_length: int | None = None,
        pad_to: int | None = None,
        use_bpe: bool = True,
        return_tensors: str | None = None,
    ) -> list[list[int]] | Any:
        """Encode, optionally wrap in ``<s> … </s>``, truncate and right-pad with ``pad_id`` (1).

        ``max_length`` caps each row's length including bos/eos (eos is kept when truncating). Rows are
        padded to the longest row, or to ``pad_to`` if given (must be >= every row). ``return_tensors`` =
        ``"pt"`` (torch int64 tensor) or ``"np"`` (int64 array); ``None`` returns padded lists.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch() expects a sequence of strings; use encode() for one string")
        texts = list(texts)
        if use_bpe:
            rows = [list(r) for r in self._backend.encode_many(texts)] if texts else []
        else:
            rows = [self.encode(t, use_bpe=False) for t in texts]
        n_extra = 2 if add_bos_eos else 0
        if max_length is not None and max_length < n_extra + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text tokens")
        out = []
        for r in rows:
            if max_length is not None:
                r = r[: max_length - n_extra]
            out.append([self.bos_id, *r, self.eos_id] if add_bos_eos else r)
        longest = max((len(r) for r in out), default=0)
        width = longest
        if pad_to is not None:
            if pad_to < longest:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest}); set max_length")
            width = pad_to
        padded = [r + [self.pad_id] * (width - len(r)) for r in out]
        if return_tensors is None:
            return padded
        if return_tensors == "np":
            return np.asarray(padded, dtype=np.int64).reshape(len(padded), width)
        if return_tensors == "pt":
            import torch

            return torch.tensor(padded, dtype=torch.long).reshape(len(padded), width)
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")

    def __call__(self, text: str | Sequence[str], **kwargs: Any) -> list[int] | list[list[int]] | Any:
        """``tok("x")`` -> ids of one string with bos/eos; ``tok([...])`` -> :meth:`encode_batch`."""
        if isinstance(text, str):
            return self.encode_batch([text], **kwargs)[0]
        return self.encode_batch(text, **kwargs)

    # ---------------------------------------------------------------- internals

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        return i


def _as_int_array(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids if not isinstance(ids, (int, np.integer)) else [ids])
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------------------
# SentencePiece training
# ----------------------------------------------------------------------------------------------------------


def _iter_corpus_lines(path: Path, tsv_column: int | None) -> Iterator[str]:
    is_tsv = path.suffix.lower() == ".tsv"
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if is_tsv:
                cols = line.split("\t")
                if tsv_column is None:
                    raise ValueError(f"{path} is a .tsv file: pass tsv_column (--tsv-column) to pick the text column")
                if tsv_column >= len(cols):
                    raise ValueError(f"{path}:{lineno}: has {len(cols)} columns, tsv_column={tsv_column} requested")
                line = cols[tsv_column]
            if line.strip():
                yield line


def train_sentencepiece(
    input_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    *,
    tsv_column: int | None = None,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    prefix_space: bool = True,
    max_sentences: int = 0,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    num_codes: int = DEFAULT_NUM_CODES,
    num_bins: int = DEFAULT_NUM_BINS,
    verbose: bool = False,
) -> BiomedGPTTokenizer:
    """Train a lossless SentencePiece model in BiomedGPT layout and save it (with config) to ``out_dir``.

    ``input_files`` are UTF-8 text, one sentence per line; ``.tsv`` files contribute column ``tsv_column``.
    ``prefix_space`` trains on ``" " + line`` because BiomedGPT texts start with a space, so word-initial
    pieces are learned in their "▁word" form. ``vocab_size`` counts the 4 specials and 256 byte-fallback
    pieces (but not ``<mask>``/codes/bins). ``max_sentences`` > 0 samples that many lines.
    """
    import sentencepiece as spm

    if not input_files:
        raise ValueError("no input files given")
    if tsv_column is not None and tsv_column < 0:
        raise ValueError(f"tsv_column must be >= 0, got {tsv_column}")
    min_vocab = NUM_SPECIAL + 256 + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} too small: need > 4 specials + 256 byte pieces ({min_vocab})")
    paths = [Path(p) for p in input_files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
        if next(_iter_corpus_lines(p, tsv_column), None) is None:
            raise ValueError(f"input file {p} contains no non-empty lines (empty corpus)")

    def sentences() -> Iterator[str]:
        for p in paths:
            for line in _iter_corpus_lines(p, tsv_column):
                yield (" " + line) if prefix_space and not line.startswith(" ") else line

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spm_train_") as tmp:
        prefix = os.path.join(tmp, "spm")
        kwargs: dict[str, Any] = {
            "sentence_iterator": sentences(),
            "model_prefix": prefix,
            "vocab_size": int(vocab_size),
            "model_type": model_type,
            "character_coverage": float(character_coverage),
            "bos_id": 0,
            "pad_id": 1,
            "eos_id": 2,
            "unk_id": 3,
            "bos_piece": BOS,
            "pad_piece": PAD,
            "eos_piece": EOS,
            "unk_piece": UNK,
            "byte_fallback": True,
            "normalization_rule_name": "identity",
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "split_digits": True,
            "max_sentence_length": int(max_sentence_length),
            "num_threads": int(num_threads or min(16, os.cpu_count() or 1)),
            "minloglevel": 0 if verbose else 2,
        }
        if max_sentences:
            kwargs.update(input_sentence_size=int(max_sentences), shuffle_input_sentence=True)
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as e:  # e.g. "Vocabulary size is too high (5000). Please set it to a value <= 812."
            raise ValueError(f"SentencePiece training failed: {e}") from e
        shutil.copyfile(prefix + ".model", out / SPM_MODEL_NAME)
    tok = BiomedGPTTokenizer.from_sentencepiece(out / SPM_MODEL_NAME, num_codes=num_codes, num_bins=num_bins)
    tok.save_pretrained(out)
    return tok
