"""Evaluations of a pre-trained encoder that train nothing: feature extraction, k-NN, leave-one-out 1-NN.
(Linear probing and fine-tuning train, so they are methods: mimkit.methods.linprobe / finetune.)"""

from mimkit.eval.features import classify, evaluating, extract_features, topk_accuracy
from mimkit.eval.knn import check_knn_sources, knn_evaluate, knn_predict, loo_nearest, loo_nn_evaluate

__all__ = [
    "check_knn_sources",
    "classify",
    "evaluating",
    "extract_features",
    "knn_evaluate",
    "knn_predict",
    "loo_nearest",
    "loo_nn_evaluate",
    "topk_accuracy",
]
