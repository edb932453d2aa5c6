"""Evaluation metrics of the BiomedGPT fine-tuning tasks (spec §6.2/§6.3), without third-party metric packages.

- VQA: :func:`vqa_accuracy` (exact match weighted by reference confidence, with closed/open split)
- captioning: :func:`caption_metrics` (CIDEr-D and ROUGE-L after the original's ``_bioclean``)
- summarization: :func:`summary_metrics` (rouge-score ROUGE-1/2/L F with Porter stemming, Gigaword post-processing)
- NLI / classification: :func:`accuracy`

See :mod:`biomedgpt.evaluation.metrics` for the exact semantics and where they differ from pycocoevalcap/rouge-score.
"""

from biomedgpt.evaluation.metrics import (
    DocumentFrequency,
    PorterStemmer,
    RougeScore,
    accuracy,
    bioclean,
    caption_cider_d,
    caption_metrics,
    cider_d_scores,
    compute_document_frequency,
    fix_tokenization,
    load_document_frequency,
    postprocess_summary,
    rouge_l,
    rouge_score_pair,
    rouge_scores,
    rouge_tokenize,
    summary_metrics,
    vqa_accuracy,
)

__all__ = [
    "DocumentFrequency",
    "PorterStemmer",
    "RougeScore",
    "accuracy",
    "bioclean",
    "caption_cider_d",
    "caption_metrics",
    "cider_d_scores",
    "compute_document_frequency",
    "fix_tokenization",
    "load_document_frequency",
    "postprocess_summary",
    "rouge_l",
    "rouge_score_pair",
    "rouge_scores",
    "rouge_tokenize",
    "summary_metrics",
    "vqa_accuracy",
]
