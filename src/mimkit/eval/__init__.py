"""Evaluations of a pre-trained encoder."""

from mimkit.eval.knn import (
    extract_features,
    knn_evaluate,
    knn_predict,
    loo_nearest,
    loo_nn_evaluate,
    topk_accuracy,
)

__all__ = [
    "extract_features",
    "knn_evaluate",
    "knn_predict",
    "loo_nearest",
    "loo_nn_evaluate",
    "topk_accuracy",
]
