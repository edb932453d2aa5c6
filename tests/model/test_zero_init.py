"""Building under DeepSpeed ZeRO-3 ``zero.Init``: parameters are partitioned as they are created, the tied
embedding stays one parameter, and the original initialisation still applies (gathered per module)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import deepspeed, torch
    deepspeed.init_distributed(dist_backend="gloo")
    from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    config = BiomedGPTConfig.for_size("tiny", vocab_size=9300)
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
        model = BiomedGPTForConditionalGeneration(config)
    embedding = model.encoder.embed_tokens.weight
    result = {
        "local_numel": embedding.numel(),
        "full_shape": list(embedding.ds_shape),
        "tied": model.decoder.output_projection.weight is embedding,
        "n_shared": sum(1 for p in model.parameters() if p is embedding),
    }
    with deepspeed.zero.GatheredParameters([embedding, model.encoder.pos_q_linear.weight,
                                            model.encoder.layers[0].self_attn.c_attn]):
        result["embedding_std"] = embedding.std().item()
        result["padding_row"] = embedding[1].abs().sum().item()
        result["linear_std"] = model.encoder.pos_q_linear.weight.std().item()
        result["c_attn"] = model.encoder.layers[0].self_attn.c_attn.tolist()
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
def test_model_builds_partitioned_under_zero_init(tmp_path, free_port):
    env = {"TEST_PORT": str(free_port)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["local_numel"] == 0  # partitioned away while building: no full copy held
    assert result["full_shape"] == [9300, 256]
    assert result["tied"] and result["n_shared"] == 1
    assert abs(result["embedding_std"] - 0.02) < 0.002
    assert abs(result["linear_std"] - 0.02) < 0.002
    assert result["padding_row"] == 0.0
    assert result["c_attn"] == [1.0, 1.0, 1.0, 1.0]
