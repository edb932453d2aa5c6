import pytest
import safetensors.torch
import torch
from model_configs import TEST_VOCAB, small_test_config
from transformers import AutoModelForSeq2SeqLM

from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.layers import DropPath

VOCAB = TEST_VOCAB


def make_batch(batch=3, text_len=7, target_len=5, image_px=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (batch, text_len), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 4], ids[1, 5:] = 2, 1  # a shorter, right-padded sample
    images = torch.randn(batch, 3, image_px, image_px, generator=gen)
    patch_masks = torch.tensor([True, False, True][:batch])  # sample 1 has no image
    decoder_ids = torch.randint(4, 100, (batch, target_len), generator=gen)
    decoder_ids[:, 0] = 0
    return dict(input_ids=ids, patch_images=images, patch_masks=patch_masks, decoder_input_ids=decoder_ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128)).eval()


def test_forward_returns_seq2seq_output(model):
    batch = make_batch()
    out = model(**batch)
    assert out.logits.shape == (3, 5, VOCAB)
    # 64 px -> 4x4 patches, prepended to 7 text tokens.
    assert out.encoder_last_hidden_state.shape == (3, 16 + 7, 64)
    assert torch.isfinite(out.logits).all()


def test_sdpa_and_reference_attention_agree_in_values_and_gradients():
    torch.manual_seed(1)
    model = BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128))
    batch = make_batch()
    labels = torch.randint(4, 100, batch["decoder_input_ids"].shape)
    results = {}
    for backend in ("reference", "sdpa"):
        model.zero_grad()
        model.set_attention_backend(backend)
        out = model(**batch, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    (ref_logits, ref_grads), (sdpa_logits, sdpa_grads) = results["reference"], results["sdpa"]
    torch.testing.assert_close(sdpa_logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert ref_grads.keys() == sdpa_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(sdpa_grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)
    # The bias is learned: its sources must receive gradient through the fused path.
    for name in (
        "encoder.token_rel_pos_table_list.0.weight",
        "encoder.image_rel_pos_table_list.1.weight",
        "encoder.pos_q_linear.weight",
        "encoder.embed_image_positions.weight",
        "decoder.self_pos_k_linear.weight",
        "decoder.cross_pos_q_linear.weight",
        "decoder.token_rel_pos_table_list.1.weight",
    ):
        assert sdpa_grads[name].abs().sum() > 0, name


def test_cached_decoding_matches_full_decoding(model):
    batch = make_batch()
    full = model(**batch).logits
    encoder_out = model.encode(batch["input_ids"], patch_images=batch["patch_images"], patch_masks=batch["patch_masks"])
    cache, steps = None, []
    for t in range(batch["decoder_input_ids"].shape[1]):
        logits, cache = model.decode(batch["decoder_input_ids"][:, t : t + 1], encoder_out, cache, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_image_content_is_ignored_for_samples_without_image(model):
    batch = make_batch()
    first = model(**batch).logits
    batch["patch_images"][1] = torch.randn(3, 64, 64) * 10
    second = model(**batch).logits
    torch.testing.assert_close(second[1], first[1])
    batch["patch_images"][0] += 1.0
    third = model(**batch).logits
    assert (third[0] - first[0]).abs().max() > 1e-4  # a real image does matter


def test_text_only_input(model):
    batch = make_batch()
    out = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    assert out.encoder_last_hidden_state.shape[1] == 7
    assert torch.isfinite(out.logits).all()


def test_sample_patch_num_keeps_that_many_patches(model):
    batch = make_batch()
    gen = torch.Generator().manual_seed(3)
    enc = model.encode(
        batch["input_ids"],
        patch_images=batch["patch_images"],
        patch_masks=batch["patch_masks"],
        sample_patch_num=10,
        generator=gen,
    )
    assert enc.last_hidden_state.shape[1] == 10 + 7
    again = model.encode(
        batch["input_ids"],
        patch_images=batch["patch_images"],
        patch_masks=batch["patch_masks"],
        sample_patch_num=10,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(again.last_hidden_state, enc.last_hidden_state)


def test_code_masks_change_only_code_rows(model):
    batch = make_batch()
    plain = model(**batch).logits
    coded = model(**batch, code_masks=torch.tensor([True, False, False])).logits
    assert (coded[0] - plain[0]).abs().max() > 1e-4
    torch.testing.assert_close(coded[1:], plain[1:], atol=1e-5, rtol=1e-4)


def test_labels_give_token_mean_cross_entropy(model):
    batch = make_batch()
    labels = torch.randint(4, 100, batch["decoder_input_ids"].shape)
    labels[0, -2:] = 1  # padded targets are ignored
    out = model(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}, labels=labels)
    keep = labels.ne(1)
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def test_tied_embedding_is_one_parameter_and_freezes_together(model):
    shared = model.encoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight is shared
    assert model.decoder.output_projection.weight is shared
    assert sum(1 for p in model.parameters() if p is shared) == 1
    model.set_embedding_trainable(False)
    try:
        assert not model.get_output_embeddings().weight.requires_grad
    finally:
        model.set_embedding_trainable(True)
    assert float(shared[1].detach().abs().sum()) == 0.0  # padding row starts at zero


def test_state_dict_uses_the_fairseq_layout(model):
    state = model.state_dict()
    heads, dim = 4, 64
    expected = {
        "encoder.embed_tokens.weight": (VOCAB, dim),
        "decoder.embed_tokens.weight": (VOCAB, dim),
        "decoder.output_projection.weight": (VOCAB, dim),
        "encoder.type_embedding.weight": (2, dim),
        "encoder.embed_positions.weight": (1026, dim),
        "encoder.embed_image_positions.weight": (1765, dim),
        "encoder.image_proj.weight": (dim, 1024),
        "encoder.embed_images.conv1.weight": (64, 3, 7, 7),
        "encoder.embed_images.layer3.5.bn3.running_mean": (1024,),
        "encoder.embed_images.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "encoder.layers.1.self_attn.c_attn": (heads,),
        "encoder.layers.0.attn_ln.weight": (dim,),
        "encoder.layers.0.ffn_layernorm.weight": (128,),
        "encoder.token_rel_pos_table_list.1.weight": (511, heads),
        "encoder.image_rel_pos_table_list.0.weight": (6892, heads),
        "decoder.layers.0.self_attn_ln.bias": (dim,),
        "decoder.layers.0.encoder_attn.c_attn": (heads,),
        "decoder.layers.0.encoder_attn_layer_norm.weight": (dim,),
        "decoder.layers.1.cross_attn_ln.weight": (dim,),
        "decoder.code_layernorm_embedding.weight": (dim,),
        "decoder.cross_pos_k_linear.weight": (dim, dim),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.endswith("_rp_bucket") or k.endswith("image_position_idx") for k in state)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(2)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.for_size("tiny", vocab_size=VOCAB)).eval()
    batch = make_batch()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved_keys = set(safetensors.torch.load_file(tmp_path / "model.safetensors").keys())
    assert "encoder.embed_tokens.weight" in saved_keys
    assert "decoder.output_projection.weight" not in saved_keys  # tied weight written once

    for loader in (BiomedGPTForConditionalGeneration, AutoModelForSeq2SeqLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, BiomedGPTForConditionalGeneration)
        assert loaded.decoder.output_projection.weight is loaded.encoder.embed_tokens.weight
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_bf16_forward_close_to_fp32(model, backend):
    batch = make_batch()
    model.set_attention_backend(backend)
    try:
        expected = model(**batch).logits
        low = BiomedGPTForConditionalGeneration(model.config)
        low.load_state_dict(model.state_dict())
        low = low.to(torch.bfloat16).eval()
        batch["patch_images"] = batch["patch_images"].bfloat16()
        logits = low(**batch).logits
    finally:
        model.set_attention_backend("sdpa")
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_frozen_batch_norm_has_no_trainable_statistics():
    model = BiomedGPTForConditionalGeneration(small_test_config(ffn_dim=128, resnet_norm="frozen")).train()
    names = {n for n, _ in model.named_parameters()}
    assert not any(".bn" in n or "downsample.1" in n for n in names)
    assert "encoder.embed_images.bn1.running_var" in model.state_dict()
    batch = make_batch()
    with torch.no_grad():
        first = model.encode(batch["input_ids"], patch_images=batch["patch_images"]).last_hidden_state
        second = model.encode(batch["input_ids"], patch_images=batch["patch_images"]).last_hidden_state
    torch.testing.assert_close(first, second)


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(64, 3, 5)
    out = layer(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert 0 < int((per_sample[:, 0] == 0).sum()) < 64
    assert torch.equal(layer.eval()(x), x)


def test_explicit_patch_indices_select_those_patches(model):
    batch = make_batch()
    indices = torch.tensor([[0, 5, 15], [1, 2, 3], [15, 14, 0]])
    enc = model.encode(batch["input_ids"], patch_images=batch["patch_images"], patch_indices=indices)
    assert enc.last_hidden_state.shape[1] == 3 + 7
    # The kept patches' position embeddings are those of their grid cells (4x4 grid on the 42-wide table).
    full = model.encode(batch["input_ids"], patch_images=batch["patch_images"])
    expected = full.position_embeddings[0, [0, 5, 15]]
    torch.testing.assert_close(enc.position_embeddings[0, :3], expected)
    with pytest.raises(ValueError, match="patch_indices"):
        model.encode(batch["input_ids"], patch_images=batch["patch_images"], patch_indices=indices + 16)
