"""BiomedGPT-Train: pretraining and fine-tuning of BiomedGPT vision-language models."""

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration

__version__ = "0.1.0"

__all__ = ["BiomedGPTConfig", "BiomedGPTForConditionalGeneration", "__version__"]
