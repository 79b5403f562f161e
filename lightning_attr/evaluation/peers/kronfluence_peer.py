"""Kronfluence's EK-FAC influence (``Analyzer.fit_all_factors`` + ``compute_pairwise_scores``).

Measurement: the query's cross-entropy (the benchmark's measurement); train loss: summed
cross-entropy, as Kronfluence's ``Task`` contract asks. Kronfluence's pairwise score is
``grad f_q^T (G + damping)^{-1} grad l_i``: positive for proponents, as in this package.
Kronfluence writes factors and scores under ``output_dir`` (safetensors + JSON arguments) and
recomputes the training gradients on every ``compute_pairwise_scores`` call; both are part of
its cost and are timed as such.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_attr.evaluation.peers.base import Peer, dir_bytes, require


class KronfluenceEKFAC(Peer):
    """EK-FAC influence through Kronfluence.

    Args:
        damping_factor: Kronfluence's ``ScoreArguments.damping_factor`` (its default 1e-8;
            None = its heuristic, 0.1 x the mean eigenvalue).
        strategy: Kronfluence's factor strategy (``"ekfac"`` default; ``"kfac"``, ``"diagonal"``...).
        output_dir: where Kronfluence writes (default: a fresh temporary directory).
    """

    def __init__(self, damping_factor: float | None = 1e-8, strategy: str = "ekfac", output_dir: str | None = None) -> None:
        self.config = {"package": "kronfluence", "strategy": strategy, "damping_factor": damping_factor}
        self.name = f"{strategy.upper()} (kronfluence)"
        self._output_dir = output_dir
        self._calls = 0

    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        analyzer_mod = require("kronfluence.analyzer")
        task_mod = require("kronfluence.task")
        args_mod = require("kronfluence.arguments")

        class _Task(task_mod.Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.distributions.Categorical(logits=logits.detach()).sample()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        self._tmp = None
        if self._output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kronfluence-")
            self._output_dir = self._tmp.name
        model = analyzer_mod.prepare_model(copy.deepcopy(models[0]), _Task())
        self._analyzer = analyzer_mod.Analyzer(
            analysis_name="bench", model=model, task=_Task(), cpu=True, disable_tqdm=True, output_dir=str(Path(self._output_dir))
        )
        self._args = args_mod
        self._train = TensorDataset(x_train, y_train)
        self._analyzer.fit_all_factors(
            factors_name="factors",
            dataset=self._train,
            per_device_batch_size=256,
            factor_args=args_mod.FactorArguments(strategy=self.config["strategy"]),
            overwrite_output_dir=True,
        )
        self._storage = dir_bytes(self._output_dir)  # the fitted factors (safetensors) and their arguments

    def storage_bytes(self) -> int:
        return self._storage

    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        self._calls += 1
        name = f"scores{self._calls}"
        self._analyzer.compute_pairwise_scores(
            scores_name=name,
            factors_name="factors",
            query_dataset=TensorDataset(x_query, y_query),
            train_dataset=self._train,
            per_device_query_batch_size=max(1, len(x_query)),
            per_device_train_batch_size=512,
            score_args=self._args.ScoreArguments(damping_factor=self.config["damping_factor"]),
            overwrite_output_dir=True,
        )
        scores = self._analyzer.load_pairwise_scores(name)["all_modules"]
        return scores.float().contiguous()  # [Q, n_train]
