"""BLEU-4 and ROUGE-1/2/L as THUDM's compute_metrics (reference §6.5): jieba words for ROUGE
(rouge_chinese, F × 100), characters for BLEU-4 (nltk sentence_bleu, smoothing method3, × 100).
An empty prediction or reference scores 0 instead of crashing rouge_chinese."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from chatglm.tokenizer import ChatGLMTokenizer

from .data import IGNORE_INDEX

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """The four scores of one prediction, each × 100 and rounded to 4 places as THUDM does."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    hypothesis = " ".join(jieba.cut(prediction))
    ref = " ".join(jieba.cut(reference))
    if hypothesis.strip() and ref.strip():
        rouge = Rouge().get_scores(hypothesis, ref)[0]
        scores = {k: round(rouge[k]["f"] * 100, 4) for k in METRIC_NAMES[:3]}
    else:  # rouge_chinese raises "Hypothesis is empty." / "Reference is empty."
        scores = {k: 0.0 for k in METRIC_NAMES[:3]}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def mean_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    per_pair = [score_pair(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: float(np.mean([s[k] for s in per_pair])) if per_pair else 0.0 for k in METRIC_NAMES}


def decode_rows(ids: np.ndarray, tok: ChatGLMTokenizer) -> list[str]:
    """Decode padded id rows (-100 read as pad 0); special ids decode to "" as in THUDM."""
    ids = np.where(ids != IGNORE_INDEX, ids, tok.pad_id)
    return [tok.decode(row.tolist()) for row in ids]


class GenerationMetrics:
    """`compute_metrics` for the Trainer: EvalPrediction of generated ids and labels -> scores."""

    def __init__(self, tok: ChatGLMTokenizer):
        self.tok = tok

    def __call__(self, eval_preds) -> dict[str, float]:
        preds, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        return mean_scores(decode_rows(preds, self.tok), decode_rows(labels, self.tok))
