import math

import torch

from biomedgpt.train.loss import kept_token_count, label_smoothed_cross_entropy


def test_without_smoothing_equals_cross_entropy_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11)
    target = torch.randint(4, 11, (2, 4))
    target[1, 2:] = 1
    out = label_smoothed_cross_entropy(logits, target, epsilon=0.0)
    keep = target.ne(1)
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.nll_loss, expected)
    assert out.ntokens == 6
    per_row = [
        torch.nn.functional.cross_entropy(logits[i][keep[i]], target[i][keep[i]], reduction="sum") for i in (0, 1)
    ]
    torch.testing.assert_close(out.per_example, torch.stack(per_row))


def test_smoothing_by_hand_on_one_token():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0]]])
    target = torch.tensor([[2]])
    eps = 0.1
    lprobs = torch.log_softmax(logits, -1)[0, 0]
    eps_i = eps / 3
    expected = (1 - eps - eps_i) * -lprobs[2] + eps_i * -lprobs.sum()
    out = label_smoothed_cross_entropy(logits, target, epsilon=eps, padding_idx=-1)
    torch.testing.assert_close(out.loss, expected)


def test_example_weights_scale_each_example():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 9)
    target = torch.randint(4, 9, (2, 3))
    plain = [label_smoothed_cross_entropy(logits[i : i + 1], target[i : i + 1], 0.1).loss for i in range(2)]
    weighted = label_smoothed_cross_entropy(logits, target, 0.1, example_weights=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(weighted.loss, 2.0 * plain[0] + 0.5 * plain[1])


def test_constraint_mask_restricts_smoothing_to_allowed_tokens():
    logits = torch.tensor([[[0.0, 0.0, 3.0, 1.0, 5.0]]])
    target = torch.tensor([[2]])
    allowed = torch.tensor([[[False, False, True, True, False]]])
    out = label_smoothed_cross_entropy(logits, target, epsilon=0.2, padding_idx=-1, constraint_masks=allowed)
    p2 = math.exp(3.0) / (math.exp(3.0) + math.exp(1.0))
    nll, other = -math.log(p2), -math.log(1 - p2)
    eps_i = 0.2 / 1
    expected = (1 - 0.2 - eps_i) * nll + eps_i * (nll + other)
    assert abs(out.loss.item() - expected) < 1e-5
    assert abs(out.nll_loss.item() - nll) < 1e-5


def test_drop_worst_keeps_the_lowest_token_losses():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 13)
    target = torch.randint(4, 13, (2, 5))
    target[1, 3:] = 1  # 8 real tokens
    full = label_smoothed_cross_entropy(logits, target, epsilon=0.0)
    dropped = label_smoothed_cross_entropy(logits, target, epsilon=0.0, drop_worst_ratio=0.25)
    keep = target.ne(1)
    per_token = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
    # int(8 * 0.75) = 6 tokens stay: the 6 smallest per-token losses
    assert dropped.ntokens == 6 and kept_token_count(8, 0.25) == 6
    torch.testing.assert_close(dropped.loss, per_token.sort().values[:6].sum())
    assert dropped.loss < full.loss
    # the per-example sums cover exactly the kept tokens
    rows = torch.arange(2)[:, None].expand_as(target)[keep]
    kept_mask = torch.zeros_like(per_token, dtype=torch.bool)
    kept_mask[per_token.argsort()[:6]] = True
    expected = torch.zeros(2).index_add_(0, rows[kept_mask], per_token[kept_mask])
    torch.testing.assert_close(dropped.per_example, expected)
    assert (
        dropped.per_example_tokens.tolist()
        == torch.zeros(2, dtype=torch.long).index_add_(0, rows[kept_mask], torch.ones(6, dtype=torch.long)).tolist()
    )
    assert full.per_example_tokens.tolist() == keep.sum(1).tolist()
    assert label_smoothed_cross_entropy(logits, target, drop_worst_ratio=0.0).ntokens == 8


def test_drop_worst_starts_after_the_configured_update():
    from biomedgpt.train.config import OptimSection

    optim = OptimSection(drop_worst_ratio=0.2, drop_worst_after=600)
    assert optim.drop_worst_ratio_at(600) == 0.0  # the original: update_num > drop_worst_after
    assert optim.drop_worst_ratio_at(601) == 0.2
