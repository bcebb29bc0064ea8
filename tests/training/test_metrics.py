"""BLEU-4 / ROUGE as THUDM's compute_metrics, and decoding of padded generation outputs."""
import numpy as np
from transformers import EvalPrediction

from training.metrics import GenerationMetrics, mean_scores, score_pair


def test_identical_texts_score_100():
    s = score_pair("这条裙子很好看", "这条裙子很好看")
    assert s["bleu-4"] == 100.0
    assert all(abs(s[k] - 100.0) < 1e-3 for k in ("rouge-1", "rouge-2", "rouge-l"))


def test_empty_prediction_scores_zero_instead_of_crashing():
    s = score_pair("", "这条裙子很好看")
    assert s == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def test_partial_overlap_is_between_and_mean_is_plain_average():
    part = score_pair("这条裙子很好看", "这条裤子很好看")
    assert 0 < part["rouge-1"] < 100 and 0 < part["bleu-4"] < 100
    m = mean_scores(["这条裙子很好看", ""], ["这条裙子很好看", "这条裤子很好看"])
    assert abs(m["bleu-4"] - 50.0) < 1e-6


def test_generation_metrics_decode_padded_ids(tok):
    ref = tok.encode("这条裙子很好看", add_special_tokens=False)
    preds = np.array([ref + [2, 0, 0]])
    labels = np.array([[-100, -100] + ref + [0]])
    scores = GenerationMetrics(tok)(EvalPrediction(predictions=preds, label_ids=labels))
    assert scores["bleu-4"] == 100.0
