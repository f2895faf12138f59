"""The lifecycles: the only place a run is started (run folder, lock, config.yaml, resume, logs, final
report). ``pretrain`` for pre-training, ``train_classifier`` for linear probing and fine-tuning,
``knn`` and ``evaluation_table`` for the evaluations."""

from mimkit.runs.classify import train_classifier
from mimkit.runs.evaluate import evaluation_table, knn
from mimkit.runs.pretrain import pretrain

__all__ = ["evaluation_table", "knn", "pretrain", "train_classifier"]
