"""Fold a vision_chat model's LoRA adapters into its weights (``biomedgpt-merge-lora IN_DIR OUT_DIR``).

``IN_DIR`` is a ``biomedgpt-consolidate`` output of a run with ``model.lora``: the adapters are stored unmerged
(``…q_proj.base_layer.weight``, ``…q_proj.lora_A.default.weight``, …) and ``config.json`` keeps the LoRA settings.
``OUT_DIR`` gets the merged model in transformers' own layout (``W + alpha/r · B A`` for every adapted layer, the
``lora`` entry dropped from the config), with the tokenizer and image processor: ``LlavaForConditionalGeneration``
loads it (a ``mlp2x_gelu`` projector) and it trains further (``model.init_from``), e.g. with a new adapter.

``adapter_dir`` also writes the adapters as PEFT saves them (``adapter_config.json``, ``adapter_model.safetensors``)
plus ``non_lora_trainables.safetensors`` (the projector, which trains beside the adapters), as LLaVA ships its
LoRA checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biomedgpt.checkpoint.errors import ConsolidationError
from biomedgpt.output_dirs import OutputDirError, check_output_dir, replace_output_dir, staging_dir

__all__ = ["MergeResult", "merge_lora"]

TOOL = "biomedgpt-merge-lora"
CARRIED_FILES = ("preprocessor_config.json", "processor_config.json")
NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"


@dataclass
class MergeResult:
    output_dir: Path
    merged_layers: int
    adapter_dir: Path | None

    def summary(self) -> str:
        adapter = f"; adapters as PEFT saves them in {self.adapter_dir}" if self.adapter_dir else ""
        return f"merged {self.merged_layers} LoRA layers -> {self.output_dir}{adapter}"


def _write(staging: Path, output: Path, overwrite: bool, write: Any) -> None:
    try:
        write(staging)
        replace_output_dir(staging, output, tool=TOOL, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def merge_lora(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> MergeResult:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from biomedgpt.model.vision_chat import load_vision_chat_model

    source, output = Path(model_dir), Path(output_dir)
    outputs = [output] + ([Path(adapter_dir)] if adapter_dir is not None else [])
    try:
        for out in outputs:
            check_output_dir(out, tool=TOOL, inputs=[source], overwrite=overwrite)
    except OutputDirError as error:
        raise ConsolidationError(str(error)) from None
    config_path = source / "config.json"
    try:
        lora = json.loads(config_path.read_text()).get("lora")
    except (OSError, json.JSONDecodeError) as error:
        raise ConsolidationError(f"{config_path}: not a readable model config ({error})") from error
    if not lora:
        raise ConsolidationError(f"{source}: its config.json has no LoRA settings: nothing to merge")
    model, info = load_vision_chat_model(source)
    problems = [f"{kind}: {', '.join(keys[:5])}" for kind, keys in info.items() if keys]
    if problems:
        raise ConsolidationError(f"{source}: the weights do not fit the model ({'; '.join(problems)})")
    model.eval()

    if adapter_dir is not None:
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["targets"], bias="none")  # fmt: skip
        # Keyed as a PeftModel saves them (its wrapper adds base_model.model.): PeftModel.from_pretrained loads them.
        adapters = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        trainables = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".multi_modal_projector." in n}

        def write_adapter(staging: Path) -> None:
            peft_config.save_pretrained(staging)
            save_file(adapters, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            save_file(trainables, str(staging / NON_LORA_TRAINABLES), metadata={"format": "pt"})

        _write(staging_dir(adapter_dir), Path(adapter_dir), overwrite, write_adapter)

    merged = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
                merged += 1
    del model.config.lora
    tokenizer = AutoTokenizer.from_pretrained(source)

    def write_model(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)

    _write(staging_dir(output), output, overwrite, write_model)
    return MergeResult(output, merged, Path(adapter_dir) if adapter_dir is not None else None)
