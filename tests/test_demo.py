from rich.console import Console

from biomedgpt import BiomedGPTForConditionalGeneration
from biomedgpt.demo import model_tour
from biomedgpt.tokenizer import BiomedGPTTokenizer


def test_demo_writes_a_loadable_model_and_tokenizer(tmp_path):
    console = Console(record=True, width=200)
    model_dir = model_tour(tmp_path, console)
    output = console.export_text()
    assert "CT_small.dcm" in output and "MR_small.dcm" in output
    assert "identical logits" in output
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = BiomedGPTTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)


def test_demo_leaves_a_folder_it_did_not_make_alone(tmp_path):
    from biomedgpt.demo import main

    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)  # the user's own, of a name the demo uses
    (project / "checkpoints" / "step_1.pt").write_bytes(b"weights")
    assert main(["--out", str(project), "--skip-tour"]) == 2
    assert (project / "checkpoints" / "step_1.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in project.iterdir()) == ["checkpoints"]
