"""Evaluation metrics of the BiomedGPT fine-tuning tasks, over pycocoevalcap and rouge-score.

- VQA: :func:`vqa_accuracy` (exact match weighted by reference confidence, with closed/open split)
- captioning: :func:`caption_metrics` (pycocoevalcap CIDEr-D and ROUGE-L after the original's ``_bioclean``)
- summarization: :func:`summary_metrics` (rouge-score ROUGE-1/2/L F with Porter stemming, Gigaword post-processing)
- NLI / classification: :func:`accuracy`

See :mod:`biomedgpt.evaluation.metrics` for the exact semantics.
"""

from biomedgpt.evaluation.metrics import (
    accuracy,
    bioclean,
    caption_metrics,
    fix_tokenization,
    postprocess_summary,
    rouge_scores,
    summary_metrics,
    vqa_accuracy,
)

__all__ = [
    "accuracy",
    "bioclean",
    "caption_metrics",
    "fix_tokenization",
    "postprocess_summary",
    "rouge_scores",
    "summary_metrics",
    "vqa_accuracy",
]
