"""The vision-language chat model (biomedgpt/model/vision_chat.py) and its training wrapper, in process: the
projector kinds, the placeholder count, a text-only batch that still reaches the projector (so ranks run the same
modules and a projector-only stage has a gradient), the vision tower frozen whatever the patterns, and refusals."""

from __future__ import annotations

import pytest
import torch

from biomedgpt.model.vision_chat import build_vision_chat_model, image_feature_count, vision_chat_config
from biomedgpt.train.recipes.vision_chat import VisionChatForTraining, apply_trainable

VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
LANGUAGE = {"model_type": "llama", "vocab_size": 3008, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(("projector", "tensors"), [("linear", 2), ("mlp2x_gelu", 4), ("mlp3x_gelu", 6)])
def test_projectors_and_image_positions(projector: str, tensors: int) -> None:
    config = vision_chat_config(VISION, LANGUAGE, image_token_id=3000)
    assert image_feature_count(config) == 16  # (32 / 8)^2 patches, the CLS token dropped
    model = build_vision_chat_model(config, projector)
    names = [n for n, _ in model.named_parameters() if ".multi_modal_projector." in n]
    assert len(names) == tensors
    ids = torch.tensor([[1, 5, *[3000] * 16, 7]])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 19, 3008)


def test_a_text_only_batch_still_gives_the_projector_a_gradient() -> None:
    model = build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=3000))
    trainable = apply_trainable(model, ["model.multi_modal_projector.*", "*.bias", "*proj*"])
    assert trainable and not any(name.startswith("model.vision_tower.") for name in trainable)
    wrapper = VisionChatForTraining(model, chunk_size=8)
    ids = torch.tensor([[1, 5, 9, 7, 2]])
    out = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    projector = [p for n, p in model.named_parameters() if ".multi_modal_projector." in n]
    assert all(p.grad is not None and not p.grad.any() for p in projector)  # reached, at weight 0


def test_refusals() -> None:
    with pytest.raises(ValueError, match="SigLIP tower has no CLS token"):
        vision_chat_config({**VISION, "model_type": "siglip_vision_model"}, LANGUAGE, image_token_id=3000)
    with pytest.raises(ValueError, match="choose linear or mlpNx_gelu"):
        build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=3000), "mlp2x_relu")
    with pytest.raises(ValueError, match=r"patterns \['model.projector.\*'\] match no parameter"):
        apply_trainable(build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, 3000)), ["model.projector.*"])
