"""Evaluations of a pre-trained encoder."""

from mimkit.eval.knn import extract_features, knn_evaluate, knn_predict, topk_accuracy

__all__ = ["extract_features", "knn_evaluate", "knn_predict", "topk_accuracy"]
