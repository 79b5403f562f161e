"""Evaluation: LDS / LOO metrics, retraining ground truth, and peer methods side by side."""

from lightning_attr.evaluation.metrics import (
    LeaveOneOutCorrelation,
    LinearDatamodelingScore,
    leave_out_correlations,
    linear_datamodeling_scores,
    subset_sums,
)
from lightning_attr.evaluation.retrain import (
    FixedOrderSampler,
    GroundTruth,
    RetrainingHarness,
    TrainingRecipe,
    measure_loss,
    train_many,
    training_orders,
)

__all__ = [
    "FixedOrderSampler",
    "GroundTruth",
    "LeaveOneOutCorrelation",
    "LinearDatamodelingScore",
    "RetrainingHarness",
    "TrainingRecipe",
    "leave_out_correlations",
    "linear_datamodeling_scores",
    "measure_loss",
    "subset_sums",
    "train_many",
    "training_orders",
]
