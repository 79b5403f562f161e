"""TRAK through its reference package, ``traker`` (``TRAKer``: featurize -> finalize -> score).

On CPU ``TRAKer`` uses its ``BasicProjector`` (normal projection) and must run in float32
(``use_half_precision=False``: fp16 gives all-NaN scores on CPU). Features and scores live in
memmaps under ``save_dir``; each :meth:`TraKerTRAK.score` call is a new scoring experiment, and
that file traffic is part of the measured query cost. Scores are positive for proponents
(training on the example raises the query's margin), as in this package.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import numpy as np
import torch
from torch import Tensor, nn

from lightning_attr.evaluation.peers.base import Peer, dir_bytes, require


class TraKerTRAK(Peer):
    """TRAK (``trak.TRAKer``, task ``"image_classification"``) over ``n_models`` trained models.

    Args:
        n_models: ensemble size. proj_dim: projection dimension (traker's default 2048).
        lambda_reg: ridge added to the feature kernel (traker's default 0).
        save_dir: traker's working directory (default: a fresh temporary directory).
    """

    def __init__(self, n_models: int = 1, proj_dim: int = 2048, lambda_reg: float = 0.0, save_dir: str | None = None) -> None:
        self._n_models = n_models
        self.config = {"package": "traker", "n_models": n_models, "proj_dim": proj_dim, "lambda_reg": lambda_reg, "fp16": False}
        self.name = f"TRAK-{n_models} (traker)"
        self._save_dir = save_dir
        self._calls = 0

    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        trak = require("trak")
        models = self._ensemble(models)
        if self._save_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="traker-")
            self._save_dir = self._tmp.name
        self._checkpoints = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
        self._traker = trak.TRAKer(
            model=copy.deepcopy(models[0]).eval(), task="image_classification", train_set_size=len(x_train),
            save_dir=self._save_dir, load_from_save_dir=True, device="cpu", proj_dim=self.config["proj_dim"],
            use_half_precision=False, lambda_reg=self.config["lambda_reg"], logging_level=logging.ERROR,
        )  # fmt: skip
        for model_id, ckpt in enumerate(self._checkpoints):
            self._traker.load_checkpoint(ckpt, model_id=model_id)
            for start in range(0, len(x_train), 256):
                xb, yb = x_train[start : start + 256], y_train[start : start + 256]
                self._traker.featurize(batch=(xb, yb), num_samples=len(xb))
        self._traker.finalize_features()
        self._storage = dir_bytes(self._save_dir)  # features + out_to_loss of every model, before any scoring

    def storage_bytes(self) -> int:
        return self._storage

    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        self._calls += 1
        exp = f"q{self._calls}"
        for model_id, ckpt in enumerate(self._checkpoints):
            self._traker.start_scoring_checkpoint(exp_name=exp, checkpoint=ckpt, model_id=model_id, num_targets=len(x_query))
            self._traker.score(batch=(x_query, y_query), num_samples=len(x_query))
        scores = self._traker.finalize_scores(exp_name=exp)  # [n_train, Q]
        return torch.from_numpy(np.array(scores, dtype=np.float32)).T.contiguous()
