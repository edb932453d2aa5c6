"""Raw documents -> token shards (biomedgpt/data/documents.py, ``biomedgpt-convert --kind documents``): packed rows
hold every token of every kept document exactly once, in order; truncated rows count what they cut; bad documents
are counted and written to rejects.jsonl; the shards stream; the output folder rules hold."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biomedgpt.data.documents import DocumentConversionError, convert_documents
from biomedgpt.data.parquet_shards import read_index
from biomedgpt.output_dirs import OutputDirError

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SentencePiece model the project ships, as a Llama tokenizer directory (what AutoTokenizer loads)."""
    from transformers import LlamaTokenizer

    directory = tmp_path_factory.mktemp("llama_tokenizer")
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def corpus_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (a few words to several rows) from the shipped text corpus."""
    lines = [line for line in (ASSETS / "corpus.txt").read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    return [" ".join(rng.choices(lines, k=rng.choice([1, 2, 5, 30]))) for _ in range(count)]


def expected_tokens(tokenizer, text: str) -> list[int]:
    tokens = tokenizer(text)["input_ids"]
    return tokens if tokens and tokens[-1] == tokenizer.eos_token_id else [*tokens, tokenizer.eos_token_id]


def read_rows(out: Path) -> list[dict]:
    index = read_index(str(out))
    rows: list[dict] = []
    for shard in index["shards"]:
        rows.extend(pq.read_table(out / shard["raw_data"]["basename"]).to_pylist())
    return rows


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def test_packed_rows_hold_every_token_once_in_order(tmp_path: Path, tokenizer_dir: Path, tokenizer) -> None:
    documents = corpus_documents(60)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", documents[:30])
    pq.write_table(pa.table({"text": documents[30:50]}), inputs / "b.parquet")
    for i, text in enumerate(documents[50:]):
        (inputs / f"c{i:02d}.txt").write_text(text)
    out = tmp_path / "packed"
    summary = convert_documents([inputs], out, tokenizer_dir, seq_len=64, keep_document_ids=True, rows_per_shard=7)

    # Files are read in sorted order: a.jsonl, b.parquet, c00.txt ... c09.txt, so the documents keep their order.
    per_document = [expected_tokens(tokenizer, text) for text in documents]
    stream = [token for tokens in per_document for token in tokens]
    rows = read_rows(out)
    assert [token for row in rows for token in row["input_ids"]] == stream  # nothing lost, nothing repeated
    assert all(len(row["input_ids"]) == 64 for row in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 64
    owners = [number for number, tokens in enumerate(per_document, start=1) for _ in tokens]
    assert [number for row in rows for number in row["document_ids"]] == owners
    assert [row["source_line"] for row in rows] == [row["document_ids"][0] for row in rows]
    assert summary.documents_kept == 60 and summary.tokens_written == summary.document_tokens == len(stream)
    assert summary.rows == len(rows) == -(-len(stream) // 64) and summary.shards == -(-len(rows) // 7)
    index = read_index(str(out))
    assert index["biomedgpt"]["seq_len"] == 64 and index["biomedgpt"]["eos_token_id"] == tokenizer.eos_token_id
    assert sum(shard["samples"] for shard in index["shards"]) == len(rows)


def test_truncated_rows_are_one_per_document_and_count_the_cut(tmp_path: Path, tokenizer_dir: Path, tokenizer) -> None:
    documents = corpus_documents(20, seed=1)
    out = tmp_path / "truncated"
    summary = convert_documents([write_jsonl(tmp_path / "d.jsonl", documents)], out, tokenizer_dir, seq_len=32,
                                mode="truncate")  # fmt: skip
    expected = [expected_tokens(tokenizer, text) for text in documents]
    assert [row["input_ids"] for row in read_rows(out)] == [tokens[:32] for tokens in expected]
    assert summary.tokens_truncated == sum(max(len(t) - 32, 0) for t in expected) > 0
    assert summary.tokens_written + summary.tokens_truncated == summary.document_tokens


def test_bad_documents_are_counted_and_written_to_the_reject_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = corpus_documents(8, seed=2)
    lines = [json.dumps({"text": text}).encode() for text in good[:6]]
    lines[1:1] = [
        b'{"text": "broken',  # line 2: not JSON
        json.dumps({"body": "x"}).encode(),  # line 3: no text field
        json.dumps({"text": 5}).encode(),  # line 4: not text
        json.dumps({"text": "   "}).encode(),  # line 5: empty
        b'{"text": "caf\xe9"}',  # line 6: Latin-1, not UTF-8
        b"",  # line 7: a blank line, not a document
    ]
    (inputs / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (inputs / "b.txt").write_bytes(b"\xff\xfe latin")
    (inputs / "c.txt").write_text(good[6])
    out = tmp_path / "out"
    summary = convert_documents([inputs], out, tokenizer_dir, seq_len=16)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    found = {(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects}
    assert found == {
        ("a.jsonl", 2, "unreadable_json"),
        ("a.jsonl", 3, "missing_text_field"),
        ("a.jsonl", 4, "text_not_string"),
        ("a.jsonl", 5, "empty"),
        ("a.jsonl", 6, "non_utf8"),
        ("b.txt", 1, "non_utf8"),
    }
    assert summary.rejected == {"unreadable_json": 1, "missing_text_field": 1, "text_not_string": 1, "empty": 1,
                                "non_utf8": 2}  # fmt: skip
    assert summary.documents_read == 13 and summary.documents_kept == 7 and summary.blank_lines == 1
    saved = json.loads((out / "conversion_summary.json").read_text())
    assert saved["rejected"] == summary.rejected and saved["failed"] is False


def test_too_many_rejects_fail_without_an_index(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a good one"}\n{"text": ""}\n{"x": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(DocumentConversionError, match=r"2 of 3 documents rejected .*max_reject_ratio=0.5") as info:
        convert_documents([path], out, tokenizer_dir, seq_len=16)
    assert info.value.summary is not None and info.value.summary.failed
    assert not (out / "index.json").exists() and len((out / "rejects.jsonl").read_text().splitlines()) == 2
    assert convert_documents([path], out, tokenizer_dir, seq_len=16, max_reject_ratio=1.0, overwrite=True).rows == 1
    assert (out / "index.json").is_file()


def test_parquet_without_the_text_column_names_it(tmp_path: Path, tokenizer_dir: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DocumentConversionError, match=r"p.parquet: no column 'text' \(columns: body\)"):
        convert_documents([tmp_path / "p.parquet"], tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_output_folder_rules(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", corpus_documents(4))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"not empty \(notes.txt\).*deletes nothing there"):
        convert_documents([source], foreign, tokenizer_dir, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    convert_documents([source], out, tokenizer_dir, seq_len=8)
    with pytest.raises(OutputDirError, match="--overwrite"):
        convert_documents([source], out, tokenizer_dir, seq_len=8)
    assert convert_documents([source], out, tokenizer_dir, seq_len=16, overwrite=True).seq_len == 16
    assert read_index(str(out))["biomedgpt"]["seq_len"] == 16


def test_packed_shards_stream_and_the_console_script_runs(
    tmp_path: Path, tokenizer_dir: Path, single_process: None
) -> None:
    from streaming import StreamingDataset

    from biomedgpt.cli.convert import main
    from biomedgpt.data import register_parquet_reader

    source = write_jsonl(tmp_path / "d.jsonl", corpus_documents(12, seed=3))
    out = tmp_path / "out"
    argv = [str(source), "--kind", "documents", "--tokenizer", str(tokenizer_dir), "--seq-len", "32", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    with pytest.raises(SystemExit) as usage:  # no --tokenizer: a usage error, nothing written
        main([str(source), "--kind", "documents", "--out", str(tmp_path / "x")])
    assert usage.value.code == 2 and not (tmp_path / "x").exists()
    register_parquet_reader()
    rows = read_rows(out)
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    assert [list(sample["input_ids"]) for sample in dataset] == [row["input_ids"] for row in rows]
