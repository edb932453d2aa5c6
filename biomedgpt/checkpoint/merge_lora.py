"""Fold a vision_chat model's LoRA adapters into its weights (``biomedgpt-merge-lora IN_DIR OUT_DIR``).

``IN_DIR`` is a ``biomedgpt-consolidate`` output of a run with ``model.lora``: the adapters are stored unmerged
(``…q_proj.base_layer.weight``, ``…q_proj.lora_A.default.weight``, …) and ``config.json`` keeps the LoRA settings.
``OUT_DIR`` gets the merged model in transformers' own layout (``W + alpha/r · B A`` for every adapted layer, the
``lora`` entry dropped from the config), with the tokenizer and image processor: ``LlavaForConditionalGeneration``
loads it (a ``mlp2x_gelu`` projector) and it trains further (``model.init_from``), e.g. with a new adapter.

``adapter_dir`` also writes the adapters as PEFT saves them (``adapter_config.json``, ``adapter_model.safetensors``;
an adapter trained on top of earlier ones in a subfolder of its name, as ``PeftModel.save_pretrained`` places
adapters other than ``default``) plus ``non_lora_trainables.safetensors``: every other parameter that trained beside
the adapters (the run's ``model.trainable`` patterns, recorded in the config; the projector by default), as LLaVA
ships its LoRA checkpoints.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biomedgpt.checkpoint.errors import ConsolidationError
from biomedgpt.output_dirs import OutputDirError, check_output_dir, replace_output_dir, staging_dir

__all__ = ["MergeResult", "merge_lora"]

TOOL = "biomedgpt-merge-lora"
CARRIED_FILES = ("preprocessor_config.json", "processor_config.json")
NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"
PROJECTOR_PATTERN = "model.multi_modal_projector.*"  # what trains beside the adapters when the config names nothing


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
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from biomedgpt.model.vision_chat import load_vision_chat_model, lora_adapters, merge_lora_layers

    source, output = Path(model_dir), Path(output_dir)
    outputs = [output] + ([Path(adapter_dir)] if adapter_dir is not None else [])
    try:
        for out in outputs:
            check_output_dir(out, tool=TOOL, inputs=[source], overwrite=overwrite)
    except OutputDirError as error:
        raise ConsolidationError(str(error)) from None
    config_path = source / "config.json"
    try:
        recorded = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConsolidationError(f"{config_path}: not a readable model config ({error})") from error
    if not recorded.get("lora"):
        raise ConsolidationError(f"{source}: its config.json has no LoRA settings: nothing to merge")
    model, info = load_vision_chat_model(source)
    problems = [f"{kind}: {', '.join(keys[:5])}" for kind, keys in info.items() if keys]
    if problems:
        raise ConsolidationError(f"{source}: the weights do not fit the model ({'; '.join(problems)})")
    model.eval()

    if adapter_dir is not None:
        adapters = lora_adapters(model.config)
        patterns = recorded.get("trainable") or [PROJECTOR_PATTERN]
        trainables = {
            name: parameter.detach().contiguous()
            for name, parameter in model.named_parameters()
            if ".lora_" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        }

        def write_adapter(staging: Path) -> None:
            for adapter in adapters:
                folder = staging if adapter["name"] == "default" else staging / adapter["name"]
                LoraConfig(r=adapter["r"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
                           target_modules=adapter["targets"], bias="none").save_pretrained(folder)  # fmt: skip
                state = get_peft_model_state_dict(model, adapter_name=adapter["name"])
                # Keyed as a PeftModel saves them (its wrapper adds base_model.model.): PeftModel.from_pretrained
                # loads them.
                state = {f"base_model.model.{k}": v.contiguous() for k, v in state.items()}
                save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            save_file(trainables, str(staging / NON_LORA_TRAINABLES), metadata={"format": "pt"})

        _write(staging_dir(adapter_dir), Path(adapter_dir), overwrite, write_adapter)

    merged = merge_lora_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def write_model(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)

    _write(staging_dir(output), output, overwrite, write_model)
    return MergeResult(output, merged, Path(adapter_dir) if adapter_dir is not None else None)
