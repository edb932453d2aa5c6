"""Packed documents do not attend to each other in the causal_lm recipe: rows of ``biomedgpt-convert --kind
documents --keep-document-ids`` give position ids that restart at every document (and at the padding), and the
model's output for each document of a packed row equals that document run alone; the padding of a short row changes
nothing; with ``data.mask_documents=false`` (or shards without ids) the documents see each other again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biomedgpt.data.token_stream import TokenCollator, document_position_ids, token_row
from biomedgpt.train.recipes.causal_lm import CausalLMForTraining


def test_positions_restart_at_each_document_and_at_the_padding() -> None:
    documents = torch.tensor([[3, 3, 3, 4, 5, 5], [7, 7, -1, -1, -1, -1]])
    assert document_position_ids(documents).tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]]
    # A stored row without ids (converted without --keep-document-ids) collates without positions.
    assert "position_ids" not in TokenCollator(0)([token_row({"input_ids": [1, 2, 3]})])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_packed_document_gives_its_own_loss_and_hidden_states(attention: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)  # fmt: skip
    model = CausalLMForTraining(LlamaForCausalLM(config), chunk_size=4).eval()
    first, second = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    packed = token_row({"input_ids": first + second, "document_ids": [0] * 5 + [1] * 4})
    short = token_row({"input_ids": second, "document_ids": [2] * 4})  # padded with 5 tokens in the batch

    def loss_of(rows: list[dict], collator: TokenCollator) -> torch.Tensor:
        batch = collator(rows)
        with torch.no_grad():
            return model(**batch).per_example

    def alone(tokens: list[int]) -> float:
        return float(loss_of([{"input_ids": np.asarray(tokens)}], TokenCollator(0))[0])

    per_row = loss_of([packed, short], TokenCollator(0))
    # The packed row's loss: each document's own, plus predicting the second's first token after the first's end.
    batch = TokenCollator(0)([packed])
    hidden = model.model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                    use_cache=False).last_hidden_state  # fmt: skip
    hidden_alone = [model.model.base_model(input_ids=torch.tensor([t]), use_cache=False).last_hidden_state
                    for t in (first, second)]  # fmt: skip
    torch.testing.assert_close(hidden[0, :5], hidden_alone[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden[0, 5:], hidden_alone[1][0], rtol=0, atol=1e-5)
    assert float(per_row[1]) == pytest.approx(alone(second), abs=1e-5)  # the padding is a separate run
    with torch.no_grad():
        logits = model.model.get_output_embeddings()(hidden[0, 4:5])
    boundary = float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor([second[0]]), reduction="sum"))
    assert float(per_row[0]) == pytest.approx(alone(first) + boundary + alone(second), abs=1e-4)

    # Unmasked, the second document reads the first: its states differ.
    unmasked = loss_of([packed], TokenCollator(0, mask_documents=False))
    assert abs(float(unmasked[0]) - float(per_row[0])) > 1e-3
