"""End-to-end demo of what exists so far: tokenizer, model, generation, save/load.

Run with ``make demo`` (or ``python -m biomedgpt.demo [--out DIR]``). The model is freshly initialised, so its
words are random; the point is that every piece runs on a CPU: real CT and MR slices in, beam search,
answer-constrained VQA decoding and all-candidate scoring out, then a save/load round trip.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pydicom.data
import torch
from rich.console import Console
from rich.table import Table

from biomedgpt.data.images import image_to_tensor, load_image
from biomedgpt.model import (
    BiomedGPTConfig,
    BiomedGPTForConditionalGeneration,
    DecodingConfig,
    Trie,
    count_trainable_parameters,
    generate,
    score_candidates,
)
from biomedgpt.tokenizer import BiomedGPTTokenizer

IMAGE_SIZE = 256
PROMPTS = [" what does the image describe?", " is there a lesion in the image?"]


def run_demo(out_dir: Path, console: Console) -> Path:
    torch.manual_seed(0)
    tokenizer = BiomedGPTTokenizer.default()
    console.print(f"[bold]Tokenizer[/bold]: {tokenizer!r}")

    config = BiomedGPTConfig.for_size("tiny", vocab_size=len(tokenizer))
    model = BiomedGPTForConditionalGeneration(config).eval()
    console.print(f"[bold]Model[/bold]: BiomedGPT tiny, {count_trainable_parameters(model):,} trainable parameters")

    scans = {name: pydicom.data.get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm")}
    images = torch.stack([image_to_tensor(load_image(path), IMAGE_SIZE) for path in scans.values()])
    masks = torch.ones(len(scans), dtype=torch.bool)
    input_ids = tokenizer.encode_batch([PROMPTS[0]] * len(scans), return_tensors="pt")

    started = time.perf_counter()
    captions = generate(
        model,
        input_ids,
        patch_images=images,
        patch_masks=masks,
        config=DecodingConfig(beam_size=5, max_len_b=16, no_repeat_ngram_size=3),
    )
    caption_seconds = time.perf_counter() - started

    question_ids = tokenizer.encode_batch([PROMPTS[1]] * len(scans), return_tensors="pt")
    answers = ["yes", "no"]
    trie = Trie.from_answers(answers, tokenizer)
    constrained = generate(
        model,
        question_ids,
        patch_images=images,
        patch_masks=masks,
        config=DecodingConfig(beam_size=2, max_len_b=8, constraint_trie=trie, normalize_scores=False),
    )
    candidates = [tokenizer.encode(" " + answer) for answer in answers]
    scores = score_candidates(model, question_ids, candidates, patch_images=images, patch_masks=masks)

    table = Table(title=f"Untrained tiny model on real DICOM slices ({caption_seconds:.1f} s for beam-5 captions)")
    for column in ("image", "beam-5 caption (random weights)", "trie-constrained answer", "log p(yes) / log p(no)"):
        table.add_column(column)
    for row, name in enumerate(scans):
        table.add_row(
            name,
            repr(tokenizer.decode(captions[row][0].tokens.tolist())),
            tokenizer.decode(constrained[row][0].tokens.tolist()).strip(),
            f"{scores[row, 0]:.2f} / {scores[row, 1]:.2f}",
        )
    console.print(table)

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    reloaded = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        before = model(input_ids=input_ids, patch_images=images, patch_masks=masks, decoder_input_ids=input_ids)
        after = reloaded(input_ids=input_ids, patch_images=images, patch_masks=masks, decoder_input_ids=input_ids)
    if not torch.equal(before.logits, after.logits):
        raise RuntimeError("save/load round trip changed the logits")
    console.print(f"[green]Saved and reloaded[/green] {model_dir} (safetensors + tokenizer): identical logits.")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="where to write the model (demo_out)")
    args = parser.parse_args(argv)
    console = Console()
    model_dir = run_demo(args.out, console)
    console.print(
        "\nNext: load it with [cyan]BiomedGPTForConditionalGeneration.from_pretrained"
        f"('{model_dir}')[/cyan]; train your own tokenizer with [cyan]biomedgpt-tokenizer train --input "
        "corpus.txt --vocab-size 8000 --out my_tokenizer[/cyan]; run the tests with [cyan]make test[/cyan]."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
