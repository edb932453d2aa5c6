"""The owned-output rule shared by every command that takes ``--overwrite`` (real directories, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from biomedgpt.output_dirs import (
    MANIFEST_NAME,
    OutputDirError,
    check_output_dir,
    claim_output_dir,
    replace_output_dir,
    staging_dir,
)


def _write(staging: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)


def _publish(out: Path, files: dict[str, str], overwrite: bool = False, tool: str = "tool-a") -> None:
    check_output_dir(out, tool=tool, overwrite=overwrite)
    staging = staging_dir(out)
    _write(staging, files)
    replace_output_dir(staging, out, tool=tool, overwrite=overwrite)


def test_a_new_output_appears_whole_with_its_manifest(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    _publish(out, {"a.bin": "1", "sub/b.txt": "2"})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest == {"tool": "tool-a", "entries": ["a.bin", "sub/b.txt"]}
    assert not list(out.parent.glob(".*partial*"))


def test_overwrite_removes_only_what_the_manifest_lists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish(out, {"a.bin": "1", "shard-1.bin": "x", "sub/b.txt": "2"})
    with pytest.raises(OutputDirError, match="pass --overwrite"):
        _publish(out, {"a.bin": "new"})
    _publish(out, {"a.bin": "new"}, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == sorted([MANIFEST_NAME, "a.bin"])  # stale shard and sub/ gone
    assert (out / "a.bin").read_text() == "new"


@pytest.mark.parametrize("where", ["top", "nested"])
def test_files_the_tool_did_not_write_are_never_removed(tmp_path: Path, where: str) -> None:
    out = tmp_path / "out"
    _publish(out, {"a.bin": "1", "sub/b.txt": "2"})
    mine = out / ("mine.txt" if where == "top" else "sub/mine.txt")
    mine.write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="did not write"):
            _publish(out, {"a.bin": "new"}, overwrite=overwrite)
    assert mine.read_text() == "keep" and (out / "a.bin").read_text() == "1"


def test_a_directory_without_manifest_or_of_another_tool_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "results.csv").write_text("1")
    with pytest.raises(OutputDirError, match=rf"not empty \(results.csv\) and has no {MANIFEST_NAME}"):
        _publish(plain, {"a": "1"}, overwrite=True)
    other = tmp_path / "other"
    _publish(other, {"a": "1"}, tool="tool-b")
    with pytest.raises(OutputDirError, match="holds the output of tool-b"):
        _publish(other, {"a": "2"}, overwrite=True)
    assert (plain / "results.csv").exists() and (other / "a").read_text() == "1"
    _publish(tmp_path / "empty_dir_is_fine", {"a": "1"})


def test_an_output_that_is_or_contains_the_input_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for output, word in ((run, "contains"), (run / "checkpoints", "is")):
        with pytest.raises(OutputDirError, match=f"{word} the input"):
            check_output_dir(output, tool="t", inputs=[run / "checkpoints"], overwrite=True)
    # Through a symlink too.
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(OutputDirError, match="contains the input"):
        check_output_dir(tmp_path / "link", tool="t", inputs=[run / "checkpoints"], overwrite=True)
    check_output_dir(run / "checkpoints" / "model", tool="t", inputs=[run / "checkpoints"])  # inside is fine


def test_an_empty_folder_of_the_user_is_kept_and_the_earlier_output_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish(out, {"a.bin": "1"})
    (out / "plots").mkdir()  # the user's, empty
    with pytest.raises(OutputDirError, match=r"did not write \(plots/\)"):
        _publish(out, {"a.bin": "2"}, overwrite=True)
    assert (out / "plots").is_dir() and (out / "a.bin").read_text() == "1"


def test_a_symlinked_output_is_replaced_through_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _publish(real, {"a.bin": "1"})
    (tmp_path / "link").symlink_to(real)
    _publish(tmp_path / "link", {"a.bin": "2"}, overwrite=True)
    assert (tmp_path / "link").is_symlink() and (real / "a.bin").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing left aside


def test_the_working_directory_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", str(work), str(tmp_path)):
        with pytest.raises(OutputDirError, match="working directory"):
            check_output_dir(output, tool="t")
    _publish(Path("sub"), {"a": "1"})  # a relative output below it is fine
    assert (work / "sub" / "a").read_text() == "1" and sorted(p.name for p in work.iterdir()) == ["sub"]


def test_a_manifest_entry_outside_the_output_deletes_nothing_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish(out, {"a.bin": "1"})
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["entries"].append("../victim.txt")
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    _publish(out, {"a.bin": "2"}, overwrite=True)
    assert victim.read_text() == "precious" and (out / "a.bin").read_text() == "2"


def test_a_file_appearing_while_the_tool_works_stops_the_replacement(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish(out, {"a.bin": "1"})
    check_output_dir(out, tool="tool-a", overwrite=True)
    staging = staging_dir(out)
    _write(staging, {"a.bin": "2"})
    (out / "late.txt").write_text("added meanwhile")
    with pytest.raises(OutputDirError, match="late.txt"):
        replace_output_dir(staging, out, tool="tool-a", overwrite=True)
    assert (out / "late.txt").exists() and (out / "a.bin").read_text() == "1"


def test_claim_marks_a_fresh_directory_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    out = claim_output_dir(tmp_path / "demo", tool="demo", owned=["model", "corpus"])
    (out / "model").mkdir()
    claim_output_dir(out, tool="demo", owned=["model", "corpus"])  # a re-run
    (out / "thesis.tex").write_text("x")
    with pytest.raises(OutputDirError, match="thesis.tex"):
        claim_output_dir(out, tool="demo", owned=["model", "corpus"])
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)  # a user's own folder of a name the demo uses
    with pytest.raises(OutputDirError, match="not made by demo"):
        claim_output_dir(home, tool="demo", owned=["model"])
    (out / ".model.partial-4242").mkdir()  # a consolidation killed inside the demo's folder
    (out / "thesis.tex").unlink()
    claim_output_dir(out, tool="demo", owned=["model", "corpus"])
    (out / ".thesis.partial-1").mkdir()
    with pytest.raises(OutputDirError, match=r"\.thesis\.partial-1"):
        claim_output_dir(out, tool="demo", owned=["model", "corpus"])


def test_checkpoint_command_lines_start_without_torch_or_transformers() -> None:
    """``--help`` of the checkpoint tools must not wait for torch/transformers (it took 7-12 s)."""
    code = (
        "import sys, contextlib, io\n"
        "from biomedgpt.cli import consolidate, import_checkpoint\n"
        "for module in (consolidate, import_checkpoint):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        module.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_import_size_choices_are_the_model_sizes() -> None:
    from biomedgpt.cli.import_checkpoint import SIZE_NAMES
    from biomedgpt.model.config import MODEL_SIZES

    assert tuple(MODEL_SIZES) == SIZE_NAMES


def _text_tsv(path: Path, rows: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\tsentence number {i} about a chest radiograph\n" for i in range(rows)))
    return path


def test_convert_refuses_an_out_that_holds_the_input_or_foreign_files(tmp_path: Path) -> None:
    from biomedgpt.data.convert import ConversionError, convert

    data = tmp_path / "data"
    tsv = _text_tsv(data / "text.tsv")
    with pytest.raises(ConversionError, match="contains the input"):
        convert(str(tsv), "text", str(data))
    assert tsv.read_text().count("\n") == 6 and sorted(p.name for p in data.iterdir()) == ["text.tsv"]

    out = tmp_path / "converted"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match=r"did not write \(README.md\)"):
            convert(str(tsv), "text", str(out), overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]

    # Its own earlier conversion is resumed, and --overwrite with other options replaces it.
    fresh = tmp_path / "fresh"
    convert(str(tsv), "text", str(fresh))
    assert convert(str(tsv), "text", str(fresh)).shards_reused == 1
    summary = convert(str(tsv), "text", str(fresh), rows_per_shard=3, overwrite=True)
    assert summary.rows_written == 6 and summary.shards_reused == 0


def test_convert_resumes_after_a_kill_that_left_its_temporary_files(tmp_path: Path) -> None:
    from biomedgpt.data.convert import convert

    tsv = _text_tsv(tmp_path / "text.tsv")
    out = tmp_path / "converted"
    convert(str(tsv), "text", str(out))
    for name in ("rejects.jsonl.tmp", "index.json.tmp", "conversion_summary.json.tmp"):
        (out / name).write_text("half written")  # as a SIGKILL during the final merge leaves them
    assert convert(str(tsv), "text", str(out)).rows_written == 6
    convert(str(tsv), "text", str(out), rows_per_shard=2, overwrite=True)
    assert not list(out.glob("*.tmp"))
