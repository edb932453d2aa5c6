"""The logged step loss (``biomedgpt.train.metrics.step_loss_metrics``) on the losses of a real tiny model over
real pretraining sub-batches: steps with and without auxiliary (v2) examples give comparable ``loss`` values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_configs import small_test_config

from biomedgpt.data.examples import Example
from biomedgpt.data.pipeline import PretrainCollator
from biomedgpt.model import BiomedGPTForConditionalGeneration
from biomedgpt.train.loss import label_smoothed_cross_entropy
from biomedgpt.train.metrics import step_loss_metrics
from biomedgpt.train.recipes.biomedgpt import MODEL_INPUTS

PAD, BOS, EOS = 1, 0, 2
IMAGE = 32


def _example(task: str, tokens: list[int], image: bool, weight: float = 1.0) -> Example:
    source = np.asarray([BOS, *tokens[:3], EOS], dtype=np.int64)
    target = np.asarray([*tokens, EOS], dtype=np.int64)
    prev = np.asarray([BOS, *tokens], dtype=np.int64)
    pixels = torch.randn(3, IMAGE, IMAGE) if image else None
    return Example(task, source, target, prev, pixels, weight)


@pytest.fixture(scope="module")
def model() -> BiomedGPTForConditionalGeneration:
    torch.manual_seed(0)
    return BiomedGPTForConditionalGeneration(small_test_config(d_model=32, layers=1, heads=2, ffn_dim=64)).eval()


def _sums(model: BiomedGPTForConditionalGeneration, sub_batches: dict) -> tuple[list[float], list[float]]:
    """Each sub-batch's summed loss and target tokens, as the trainer's forward computes them."""
    sums, tokens = [], []
    with torch.no_grad():
        for key in ("v1", "v2"):
            batch = sub_batches[key]
            inputs = {name: batch[name] for name in MODEL_INPUTS if batch.get(name) is not None}
            out = label_smoothed_cross_entropy(
                model(**inputs).logits, batch["target"], epsilon=0.1, padding_idx=PAD, example_weights=batch["weights"]
            )
            sums.append(float(out.loss))
            tokens.append(float(batch["ntokens"]))
    return sums, tokens


def test_loss_stays_comparable_when_the_auxiliary_sub_batch_is_missing(
    model: BiomedGPTForConditionalGeneration,
) -> None:
    torch.manual_seed(1)
    collate = PretrainCollator(PAD, BOS, EOS, auxiliary_image_size=IMAGE)
    vision = [_example("caption", [10 + i, 20 + i, 30 + i, 40 + i, 50 + i], image=True) for i in range(4)]
    text = [_example("text_infilling", [60 + i, 70 + i, 80 + i], image=False, weight=2.0) for i in range(2)]
    with_aux = collate([[*vision[:2], *text], vision[2:]])  # the original's text examples weigh 2.0
    without_aux = collate([vision[:2], vision[2:]])  # same v1; v2 is the collator's placeholder (no targets)
    assert without_aux["v2"]["ntokens"] == 0

    sums_a, tokens_a = _sums(model, with_aux)
    sums_b, tokens_b = _sums(model, without_aux)
    a = step_loss_metrics(["v1", "v2"], sums_a, tokens_a)
    b = step_loss_metrics(["v1", "v2"], sums_b, tokens_b)

    # What is optimised stays L_v1/ntok_v1 + L_v2/ntok_v2, as the backward pass divides each sub-batch.
    assert a["objective"] == pytest.approx(sums_a[0] / tokens_a[0] + sums_a[1] / tokens_a[1])
    assert a["loss_v1"] == pytest.approx(b["loss_v1"])  # the same v1 examples
    # The logged loss is the mean over all target tokens of the step: between the sub-batch means, not their sum.
    assert a["loss"] == pytest.approx((sums_a[0] + sums_a[1]) / (tokens_a[0] + tokens_a[1]))
    assert min(a["loss_v1"], a["loss_v2"]) <= a["loss"] <= max(a["loss_v1"], a["loss_v2"])
    # Without auxiliary rows there is no loss_v2 (a logged 0 read as a perfect prediction) and loss is v1's mean.
    assert "loss_v2" not in b and b["loss"] == pytest.approx(b["loss_v1"]) == pytest.approx(b["objective"])
    # The jump between the two steps is at most the v2 share of the tokens times the gap between the sub-batches,
    # where the summed objective jumped by the whole v2 loss.
    share = tokens_a[1] / sum(tokens_a)
    jump = abs(a["loss"] - b["loss"])
    assert jump <= share * abs(a["loss_v2"] - a["loss_v1"]) + 1e-6
    assert jump < 0.5 * abs(a["objective"] - b["objective"])


def test_single_sub_batch_is_the_plain_token_mean() -> None:
    """Fine-tuning (one sub-batch): loss = L / ntok, no objective or per-sub-batch copies of it."""
    assert step_loss_metrics(["main"], [30.0], [12.0]) == {"loss": 2.5}
    assert step_loss_metrics(["main"], [0.0], [0.0]) == {"loss": 0.0}
    with pytest.raises(ValueError, match="2 sub-batch names, 1 loss sums"):
        step_loss_metrics(["v1", "v2"], [1.0], [1.0, 1.0])
