"""The BiomedGPT (OFA-architecture) model: config, backbone, position biases, attention, layers, generation."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from biomedgpt.model.config import MODEL_SIZES, PUBLISHED_PARAMETER_COUNTS, BiomedGPTConfig
from biomedgpt.model.generation import DecodingConfig, Hypothesis, generate, score_candidates
from biomedgpt.model.modeling import (
    BiomedGPTEncoderOutput,
    BiomedGPTForConditionalGeneration,
    BiomedGPTPreTrainedModel,
    count_trainable_parameters,
)
from biomedgpt.trie import Trie

AutoConfig.register(BiomedGPTConfig.model_type, BiomedGPTConfig, exist_ok=True)
AutoModel.register(BiomedGPTConfig, BiomedGPTForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(BiomedGPTConfig, BiomedGPTForConditionalGeneration, exist_ok=True)

__all__ = [
    "MODEL_SIZES",
    "PUBLISHED_PARAMETER_COUNTS",
    "BiomedGPTConfig",
    "BiomedGPTEncoderOutput",
    "BiomedGPTForConditionalGeneration",
    "BiomedGPTPreTrainedModel",
    "DecodingConfig",
    "Hypothesis",
    "Trie",
    "count_trainable_parameters",
    "generate",
    "score_candidates",
]
