"""AttributionCallback: simulates per-source parameter responses while a Lightning fit runs.

The callback is glue: the maths lives in :mod:`simulation` / :mod:`curvature`, the files in
:mod:`store`. See METHOD.md for what a response is and how it is read out.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_attr import batch_format
from lightning_attr.curvature import batch_size_of, curvature_operator
from lightning_attr.functional import functional_view, to_float32, uses_output_loss
from lightning_attr.mixin import AttributionMixin
from lightning_attr.parameters import ParameterSpace
from lightning_attr.progress import CountingOperator, SimulationProgress
from lightning_attr.simulation import (
    DEFAULT_MOMENTUM,
    PROPAGATIONS,
    Damping,
    OnlineSimulation,
    StepRule,
    estimate_step_rule,
    finite_examples,
    initial_perturbations,
    simulate_responses,
)
from lightning_attr.sources import SourceMap, SourceSpec, indexed_base, split_batch
from lightning_attr.spectral import eigen_responses
from lightning_attr.store import ResponseStore, complete_sources, has_store

_MODES = ("online", "end")
_CODECS = ("dense", "eigen")
_DIVERGED = (
    "The training loss diverged: every example's loss was non-finite at global step {step} (a learning rate "
    "too high, or NaN/inf in the data). Fix the training first: attribution explains a trained model."
)
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class AttributionCallback(Callback):
    r"""Writes per-source **response checkpoints** while the model trains.

    A response :math:`r_b \approx \tfrac1n (G+\lambda I)^{-1}\nabla\ell_b` is the predicted parameter
    change if source ``b`` were removed from training; ``AttributionMixin.attribute`` turns it into a
    score with forward passes only.

    Args:
        dirpath: where the :class:`ResponseStore` goes. Default: ``responses`` in Hydra's run directory when
            the fit runs inside a Hydra app, else in ``trainer.log_dir`` (``default_root_dir`` without a
            logger); if that already holds a store (a second run in the same folder), the next free
            ``responses_v1``, ``responses_v2``, ... as Lightning's loggers version their directories:
            nothing is overwritten.
        horizon: ``K``, damped curvature steps each source's perturbation is propagated for.
        damping: ``"auto"`` (``damping_scale * trace(G)/P``, the GGN's mean eigenvalue, from 32
            Hutchinson probes) or a float ``lambda``.
        curvature: ``"ggn"`` (needs ``attribution_outputs``) or ``"hessian"``.
        mode: ``"online"``: propagate on the live batches and parameters of the last epoch(s) of the fit
            (sources are injected during the epoch that ends ``horizon`` propagation steps before the end of the
            fit, see ``curvature_batch_size``; what
            is still live when a fit ends early is finished on replayed batches at the final weights);
            ``"end"``: after the fit, at the final parameters, on ``horizon`` batches of
            ``curvature_batch_size`` replayed from the training set with a private generator.
        sources: ``None`` for one source per training example, or each example's source id (``Tensor[n]``
            or a sequence of ints/strings), or a callable mapping ``LongTensor[n]`` example indices to ids.
        checkpoint_epochs: extra response checkpoints along the trajectory (1-based epoch numbers), for
            ensembles (``attribute(checkpoints="all")``). Online: one more simulation window per entry,
            injecting during that epoch, written ``horizon`` steps later with the weights of that moment.
            End: an end-mode simulation at the weights after that epoch. ``"auto"``: as many as fit in a
            budget of 100 propagation steps per source for all windows (:func:`auto_checkpoint_count`: 3 at
            ``horizon <= 25``, none at 100), spread over the second half of the fit
            (:func:`spread_checkpoint_epochs`). An entry the fit cannot honour (too late for a window to
            finish before the end) is dropped with a warning.
        curvature_batch_size: examples per curvature batch. ``mode="end"``: the replayed batches. Online:
            consecutive live batches are pooled until they hold this many examples (at most the training set),
            and each pool is one propagation step at the weights of the step that completes it, so a window
            takes ``horizon * ceil(curvature_batch_size / batch_size)`` optimizer steps. Larger pools mean less
            sampling noise in the curvature, which the accelerated rules amplify (``docs/propagation.md``).
        step_size: ``"auto"`` (``1 / (2 lambda_max + lambda)``, ``lambda_max`` by 20 power iterations) or a float.
            The accelerated rules take ``[lambda, 1/step_size]`` as the spectrum of ``G + lambda I``.
        propagation: the rule that moves each perturbation (:mod:`lightning_attr.simulation`). ``"auto"``:
            ``"chebyshev"`` in end mode with ``curvature_batch_size >= n`` (exact curvature at fixed weights),
            else ``"heavy_ball"``; the rule used is recorded in each checkpoint's ``step_rule``. Or one of
            ``"heavy_ball"``  (steps ``step_size`` with momentum ``momentum``; measured best on minibatch
            curvature), ``"neumann"`` (plain damped steps, ``O(kappa)`` products to converge) or
            ``"chebyshev"`` (Chebyshev semi-iteration, ``O(sqrt(kappa))`` with exact curvature, e.g. end mode
            with ``curvature_batch_size >= n``; it amplifies minibatch noise).
        momentum: heavy-ball's ``beta`` in ``[0, 1)``: curvature below ``(1 - beta)/step_size`` is resolved as
            if the step were ``step_size / (1 - beta)``.
        damping_scale: multiplies the automatic damping.
        chunk_size: perturbations per vmapped curvature product (bounds memory).
        store_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage of responses.
        num_examples: size ``n`` of the training set if ``len(train_dataloader.dataset)`` is not it.
        index_key: the key of the example index in dict batches (``IndexedDataset`` over dict items puts it
            there); tuple batches carry it last. ``attribution_outputs`` receives the batch without it.
        seed: seed of the callback's private generator (probes, replay order). The global RNG is never drawn.
        overwrite: replace a store already in ``dirpath`` (otherwise that is an error).
        codec: ``"dense"``: one ``P``-float response per source (simulated as above). ``"eigen"``: at the end of
            the fit (and after each ``checkpoint_epochs`` entry), the top-``rank`` eigenspace of the full-data GGN
            (randomized range finder over the training set in batches of ``curvature_batch_size``) and ``rank``
            coordinates per source of the response in it (:mod:`spectral`): the dense simulation's ``horizon``-step
            Neumann series applied exactly per eigen-direction (``horizon=10**6``: the damped inverse); ``mode``
            and ``step_size`` do not apply. Its readout costs ``rank`` forward-mode tangents per query batch,
            whatever the number of sources, and offers only ``readout="linear"``.
        rank: ``k``, eigenpairs kept by ``codec="eigen"`` (capped at ``P``).

    Training batches must end with the example index (wrap the dataset in :class:`IndexedDataset`).
    Training is left bit-for-bit unchanged: the simulation runs on detached copies in eval mode under
    a forked RNG and never writes ``.grad`` or buffers.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        horizon: int = 20,
        damping: Damping = "auto",
        curvature: str = "ggn",
        mode: str = "online",
        sources: SourceSpec = None,
        checkpoint_epochs: Sequence[int] | str | None = None,
        curvature_batch_size: int = 256,
        step_size: Damping = "auto",
        propagation: str = "auto",
        momentum: float = DEFAULT_MOMENTUM,
        damping_scale: float = 1.0,
        chunk_size: int = 2048,
        store_dtype: str = "float32",
        num_examples: int | None = None,
        index_key: str = "index",
        seed: int = 0,
        overwrite: bool = False,
        codec: str = "dense",
        rank: int = 256,
    ) -> None:
        if not isinstance(horizon, int) or horizon < 1:
            raise MisconfigurationException(f"horizon must be a positive int, got {horizon!r}.")
        if not (damping == "auto" or (isinstance(damping, (int, float)) and damping >= 0)):
            raise MisconfigurationException(f"damping must be 'auto' or a float >= 0, got {damping!r}.")
        if not (step_size == "auto" or (isinstance(step_size, (int, float)) and step_size > 0)):
            raise MisconfigurationException(f"step_size must be 'auto' or a float > 0, got {step_size!r}.")
        if propagation != "auto" and propagation not in PROPAGATIONS:
            raise MisconfigurationException(f"propagation must be 'auto' or one of {PROPAGATIONS}, got {propagation!r}.")
        if propagation in ("chebyshev", "auto") and damping != "auto" and damping <= 0:
            raise MisconfigurationException(
                f"propagation={propagation!r} needs damping > 0 (the lower end of the spectrum it accelerates "
                f"over), got {damping!r}; pass damping='auto', a positive float, or propagation='neumann'."
            )
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise MisconfigurationException(f"momentum must be a float in [0, 1), got {momentum!r}.")
        if curvature not in ("ggn", "hessian"):
            raise MisconfigurationException(f"curvature must be 'ggn' or 'hessian', got {curvature!r}.")
        if mode not in _MODES:
            raise MisconfigurationException(f"mode must be one of {_MODES}, got {mode!r}.")
        if codec not in _CODECS:
            raise MisconfigurationException(f"codec must be one of {_CODECS}, got {codec!r}.")
        if codec == "eigen" and curvature != "ggn":
            raise MisconfigurationException(
                "codec='eigen' keeps the top eigenspace of the GGN (positive semi-definite); it needs curvature='ggn'."
            )
        if not isinstance(rank, int) or rank < 1:
            raise MisconfigurationException(f"rank must be a positive int, got {rank!r}.")
        if store_dtype not in ("float32", "float16", "bfloat16"):
            raise MisconfigurationException(f"store_dtype must be float32, float16 or bfloat16, got {store_dtype!r}.")
        for name, value in (("curvature_batch_size", curvature_batch_size), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"{name} must be a positive int, got {value!r}.")
        epochs = checkpoint_epochs if checkpoint_epochs == "auto" else sorted(set(checkpoint_epochs or ()))
        if epochs != "auto" and (isinstance(checkpoint_epochs, str) or any(not isinstance(e, int) or e < 1 for e in epochs)):
            raise MisconfigurationException(
                f"checkpoint_epochs must be 'auto' or a list of positive ints, got {checkpoint_epochs!r}."
            )
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._default_dirpath = dirpath is None  # resolved in setup, restored on resume
        self.horizon, self.damping, self.curvature, self.mode = horizon, damping, curvature, mode
        self.sources, self.checkpoint_epochs = sources, epochs
        self.curvature_batch_size, self.step_size, self.damping_scale = curvature_batch_size, step_size, damping_scale
        self.propagation, self.momentum = propagation, float(momentum)
        if not isinstance(index_key, str) or not index_key:
            raise MisconfigurationException(f"index_key must be a non-empty str, got {index_key!r}.")
        self.chunk_size, self.store_dtype, self.num_examples = chunk_size, store_dtype, num_examples
        self.index_key = index_key
        self.seed, self.overwrite = seed, overwrite
        self.codec, self.rank = codec, rank
        self._reset()

    def _reset(self) -> None:
        self._store: ResponseStore | None = None
        self._source_map: SourceMap | None = None
        self._space: ParameterSpace | None = None
        self._windows: list[_Window] = []
        self._end_epochs: list[int] = []
        self._pool: list[Any] = []  # live curvature batches not yet propagated on (online)
        self._pending: list[tuple[Any, Tensor]] = []
        self._last_step = -1
        self._products = 0
        self._seconds = 0.0
        self._fit_start = 0.0
        self._restored: dict[str, Any] | None = None
        self._warned_non_finite = False
        self._batch_format: dict | None = None  # the training batches' format, checked against queries
        self._diverged_at: int | None = None  # first step at which every example's loss was non-finite

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, mode=self.mode, horizon=self.horizon)

    def _settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "horizon": self.horizon, "damping": self.damping, "curvature": self.curvature,
            "curvature_batch_size": self.curvature_batch_size, "step_size": self.step_size,
            "propagation": self.propagation, "momentum": self.momentum, "damping_scale": self.damping_scale,
            "checkpoint_epochs": self.checkpoint_epochs, "store_dtype": self.store_dtype, "seed": self.seed,
            "index_key": self.index_key, "codec": self.codec, "rank": self.rank,
        }  # fmt: skip

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, AttributionMixin):
            raise MisconfigurationException(
                f"AttributionCallback needs a LightningModule that mixes in AttributionMixin; "
                f"{type(pl_module).__name__} does not. Declare `class {type(pl_module).__name__}(AttributionMixin, "
                "L.LightningModule)` and implement attribution_outputs / attribution_output_loss."
            )
        if self.curvature == "ggn" and not uses_output_loss(pl_module):
            raise MisconfigurationException(
                f"curvature='ggn' needs {type(pl_module).__name__}.attribution_outputs(batch) and "
                "attribution_output_loss(outputs, batch); implement them or pass curvature='hessian'."
            )
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"AttributionCallback does not support the {strategy} strategy (sharded parameters); use a "
                "single device or DDP."
            )
        if trainer.world_size > 1 and self._online:
            raise MisconfigurationException(
                f"mode='online' runs on a single process; with {trainer.world_size} processes ({strategy}) use "
                "mode='end', which simulates on rank zero after the fit."
            )
        if self.dirpath is None:
            self.dirpath = _default_dirpath(trainer, self.overwrite) if trainer.is_global_zero else None
        self.dirpath = trainer.strategy.broadcast(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        n, members = (self.num_examples, None) if self.num_examples else _training_examples(trainer)
        self._source_map = SourceMap.build(self.sources, n, members)
        self._space = ParameterSpace.of(pl_module)
        if self._online:
            self._windows = self._plan_windows(trainer)
        else:
            self._end_epochs = self._plan_end_checkpoints(trainer)
        if trainer.is_global_zero:
            # here, not in setup: a resumed fit has restored this callback's state by now
            resuming = self._restored is not None and has_store(self.dirpath)
            if has_store(self.dirpath) and not (self.overwrite or resuming):
                raise MisconfigurationException(
                    f"{self.dirpath} already holds a response store; pass overwrite=True to replace it or choose "
                    "another dirpath (nothing was changed)."
                )
            if resuming:
                self._store = ResponseStore.load(self.dirpath)
            else:
                self._store = ResponseStore.create(
                    self.dirpath, self._space, self._source_map, self._settings(), overwrite=True
                )
        trainer.strategy.barrier()

    @property
    def _online(self) -> bool:
        """Whether responses are simulated on the live batches (``mode="online"`` with dense responses)."""
        return self.mode == "online" and self.codec == "dense"

    def _plan_windows(self, trainer: L.Trainer) -> list[_Window]:
        """The final window, plus one per checkpoint epoch (injecting during that epoch). Warns about a
        requested epoch that cannot be honoured and about a final window at near-initial weights."""
        final, per_epoch = self._plan_injection_epoch(trainer)
        window_steps = self._window_steps(trainer)
        when = (
            f"with {per_epoch} optimizer steps per epoch, {int(trainer.estimated_stepping_batches)} in the fit and "
            f"horizon={self.horizon}"
        ) + (
            f" (= {window_steps} optimizer steps: one propagation step per curvature_batch_size="
            f"{self.curvature_batch_size} live examples)" if window_steps != self.horizon else ""
        )
        if final <= 1:
            needed = 3 + math.ceil(window_steps / per_epoch)
            rank_zero_warn(
                f"The final simulation window injects the sources during epoch {final + 1}, at near-initial weights "
                f"({when}, a window needs one epoch + horizon steps before the end of the fit): its responses "
                f"describe an early model, not the trained one. Train for at least {needed} epochs, lower horizon, "
                "or use mode='end' (simulates at the final weights)."
            )
        if self.checkpoint_epochs == "auto":
            epochs = [e + 1 for e in spread_checkpoint_epochs(final, auto_checkpoint_count(self.horizon))]
        else:
            epochs = [e for e in self.checkpoint_epochs if e - 1 < final]
            dropped = [e for e in self.checkpoint_epochs if e - 1 >= final]
            if dropped:
                latest = f"the latest possible is {final}" if final >= 1 else "no epoch is early enough"
                rank_zero_warn(
                    f"checkpoint_epochs {dropped} cannot be honoured and were dropped: a window injecting during "
                    f"epoch e ends one epoch + horizon steps later and must open before the final window (epoch "
                    f"{final + 1}); {when}, {latest}. Use earlier epochs, train longer, lower horizon, or "
                    "mode='end' (checkpoints at the weights after any epoch)."
                )
        restored = (self._restored or {}).get("windows", {})
        windows = [*(_Window(f"epoch={e}", e - 1) for e in epochs), _Window("final", final)]
        for window in windows:
            window.done = restored.get(window.name) == "done"
        return windows

    def _plan_injection_epoch(self, trainer: L.Trainer) -> tuple[int, int]:
        """``(epoch the final window injects during (0-based), optimizer steps per epoch)``."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise MisconfigurationException(
                "mode='online' must know when the fit ends: set max_epochs or max_steps, or use mode='end'."
            )
        # The last epoch that ends at least `horizon` steps before the fit does: every source is injected
        # once and fully propagated on live batches. A fit too short for that (or stopped early) finishes
        # the remaining steps on replayed batches at the end (see _finish_on_replay).
        per_epoch = _steps_per_epoch(trainer)
        return max(0, (int(total) - self._window_steps(trainer)) // per_epoch - 1), per_epoch

    def _window_steps(self, trainer: L.Trainer) -> int:
        """Optimizer steps that ``horizon`` online propagation steps take: each propagates on a pool of live
        batches holding at least ``curvature_batch_size`` examples."""
        return self.horizon * self._steps_per_pool(trainer)

    def _steps_per_pool(self, trainer: L.Trainer) -> int:
        """Optimizer steps whose live batches make one online curvature batch of ``curvature_batch_size``."""
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        if not batch_size:
            return 1
        return max(1, math.ceil(self._pool_size() / (batch_size * trainer.accumulate_grad_batches)))

    def _propagation(self) -> str:
        """The rule ``propagation="auto"`` resolves to: Chebyshev at fixed weights where every curvature batch is the
        whole training set (end mode, ``curvature_batch_size >= n``: no sampling noise to amplify), heavy-ball
        otherwise (minibatch curvature, or weights that move online; docs/propagation.md)."""
        if self.propagation != "auto":
            return self.propagation
        exact = self.mode == "end" and self.curvature_batch_size >= self._source_map.num_examples
        return "chebyshev" if exact else "heavy_ball"

    def _pool_size(self) -> int:
        """Examples an online curvature batch holds at least: ``curvature_batch_size``, at most the training set."""
        return min(self.curvature_batch_size, self._source_map.num_examples)

    def _plan_end_checkpoints(self, trainer: L.Trainer) -> list[int]:
        """End mode: the epochs (1-based) after which a checkpoint is simulated; warns about those the fit never
        reaches before its end (the final checkpoint is simulated after the last epoch anyway)."""
        per_epoch = _steps_per_epoch(trainer)
        total = trainer.estimated_stepping_batches
        last = math.ceil(total / per_epoch) if math.isfinite(total) else None  # epochs in the fit
        if self.checkpoint_epochs == "auto":
            if last is None:
                raise MisconfigurationException(
                    "checkpoint_epochs='auto' spreads checkpoints over the fit and must know when it ends: set "
                    "max_epochs or max_steps, or list the epochs."
                )
            return [e + 1 for e in spread_checkpoint_epochs(last - 1, auto_checkpoint_count(self.horizon))]
        dropped = [e for e in self.checkpoint_epochs if last is not None and e >= last]
        if dropped:
            rank_zero_warn(
                f"checkpoint_epochs {dropped} cannot be honoured and were dropped: the fit has {last} epochs and "
                "the final checkpoint is simulated after the last one. Use epochs below it or train longer."
            )
        return [e for e in self.checkpoint_epochs if e not in dropped]

    # ------------------------------------------------------------------ online simulation
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        data, index = split_batch(batch, self.index_key)  # checks every batch, so a bad loader fails at once
        self._batch_format = batch_format.merge(self._batch_format, batch_format.describe(data))
        n = self._source_map.num_examples
        outside = (index < 0) | (index >= n)
        if bool(outside.any()):
            raise IndexError(
                f"Training batch holds example index {int(index[outside][0])} outside [0, {n}). Indices must "
                "address the training set; set num_examples= if it is not len(train_dataloader.dataset)."
            )
        stranger = ~self._source_map.in_training_set[index.cpu()]
        if bool(stranger.any()):
            raise IndexError(
                f"Training batch holds example index {int(index.cpu()[stranger][0])}, which is not in the training "
                "subset the callback found at the start of the fit (train_dataloader.dataset)."
            )
        if any(w.active(trainer.current_epoch) for w in self._windows):
            self._pending.append((data, index))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._pending or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        start = time.perf_counter()
        epoch = trainer.current_epoch
        finished = []
        with functional_view(pl_module, self._space) as (model, theta):
            batches = [(_to_simulation(d, theta.device), i) for d, i in self._pending]
            self._pending.clear()
            curvature_batches = self._finite(model, theta, [d for d, _ in batches])
            if not curvature_batches:  # every example non-finite: nothing to learn the curvature from
                self._diverged_at = trainer.global_step if self._diverged_at is None else self._diverged_at
                return
            active = [w for w in self._windows if w.active(epoch)]
            for window in active:
                if window.simulation is None:
                    window.simulation = self._new_online(window.name, theta)
                    window.progress = self._new_progress(trainer, window.name, window.simulation.products)
                if epoch == window.injection_epoch:
                    for data, index in batches:
                        window.simulation.inject(model, theta, data, index)
            # live batches are pooled into curvature batches of >= curvature_batch_size examples: one
            # propagation step per pool, at the weights of the step that completes it (less sampling noise)
            self._pool.extend(curvature_batches)
            if sum(batch_size_of(b) for b in self._pool) < self._pool_size():
                active = []
            else:
                operator = curvature_operator(self.curvature, model, theta, self._pool, self.chunk_size)
                self._pool = []
            for window in active:
                self._ensure_rule(window.simulation, operator, theta)
                before = window.simulation.products
                window.simulation.step(operator)
                self._count(window, window.simulation.products - before)
                if epoch > window.injection_epoch and window.simulation.num_live == 0:
                    window.complete = True
                    if window.name != "final":  # the final window is written at the end of fit, final weights
                        finished.append(window)
        self._seconds += time.perf_counter() - start
        for window in finished:  # a checkpoint window is complete: write it with the weights it ended at
            self._write_window(trainer, pl_module, window)

    def _finite(self, model: Any, theta: Tensor, batches: list[Any]) -> list[Any]:
        """Curvature batches without non-finite examples (warns once per fit with the count)."""
        kept, dropped = [], 0
        for batch in batches:
            batch, n = finite_examples(model, theta, batch)
            dropped += n
            if batch_size_of(batch) > 0:
                kept.append(batch)
        if dropped and not self._warned_non_finite:
            self._warned_non_finite = True
            rank_zero_warn(
                f"{dropped} examples with a non-finite loss were left out of the curvature batches (warned once)."
            )
        return kept

    def _new_progress(self, trainer: L.Trainer, name: str, done: int = 0) -> SimulationProgress:
        """A progress bar for one simulation: ``S x horizon`` products expected (``done`` already, on resume)."""
        progress = SimulationProgress(trainer, f"attribution ({name})", self._source_map.num_sources * self.horizon)
        progress.advance(done)
        return progress

    def _count(self, window: _Window, products: int) -> None:
        self._products += products
        if window.progress is not None:
            window.progress.advance(products)

    def _ensure_rule(self, simulation: OnlineSimulation, operator: Any, theta: Tensor) -> None:
        """A window's step rule, from its first curvature pool (the weights it opens at: the curvature of a
        mid-training window is not the final one's); a resumed window keeps the rule it was running with."""
        if simulation.rule is None:
            simulation.rule = estimate_step_rule(
                operator, theta.numel(), self.damping, self.step_size, self.damping_scale,
                torch.Generator().manual_seed(self.seed), theta.device, self._propagation(), self.momentum,
            )  # fmt: skip

    def _new_online(self, name: str, theta: Tensor) -> OnlineSimulation:
        """A window's simulation; its step rule is set at its first propagation step (:meth:`_ensure_rule`)."""
        online = OnlineSimulation(
            self._source_map.example_to_source, self._source_map.num_sources, theta.numel(), self.horizon,
            None, theta.device,
        )  # fmt: skip
        state = (self._restored or {}).get("windows", {}).get(name)
        if isinstance(state, dict):
            online.load_state_dict(state)
        return online

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        live = [w.simulation for w in self._windows if w.simulation is not None and not w.done]
        if live:  # the progress bar shows these (SimulationProgress); loggers get them here
            pl_module.log("attribution/curvature_products", float(self._products), on_step=True)
            pl_module.log("attribution/seconds", self._seconds, on_step=True)
            pl_module.log("attribution/live", float(sum(s.num_live for s in live)), on_step=True)

    # ------------------------------------------------------------------ checkpoints
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not self._online and epoch in self._end_epochs and epoch != trainer.max_epochs:
            self._simulate_at_current_weights(trainer, pl_module, f"epoch={epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._online:
            self._simulate_at_current_weights(trainer, pl_module, "final")
        else:
            self._write_open_windows(trainer, pl_module)
        fit_seconds = time.perf_counter() - self._fit_start
        rank_zero_info(
            f"lightning_attr: {self._source_map.num_sources} sources, {self._products} curvature-vector products "
            f"in {self._seconds:.1f}s ({100 * self._seconds / max(fit_seconds, 1e-9):.0f}% of the fit's "
            f"{fit_seconds:.1f}s) -> {self.dirpath}"
        )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._store is not None and any(w.simulation is not None and not w.done for w in self._windows):
            stopped_by = f"{type(exception).__name__} at global step {trainer.global_step}"
            rank_zero_warn(
                f"The fit stopped ({stopped_by}); writing the responses simulated so far as a partial checkpoint "
                "(sources not yet fully propagated score NaN)."
            )
            self._write_open_windows(trainer, pl_module, stopped_by=stopped_by)

    def _write_open_windows(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stopped_by: str | None = None
    ) -> None:
        """At the end of fit: writes every window not yet written, the final one last, after completing the
        live perturbations on replayed batches. After an exception (``stopped_by``: what stopped the fit) the
        windows are written as they are, marked partial, with the shortfall recorded."""
        self._pending.clear()
        if self._windows and self._windows[-1].simulation is None and not self._windows[-1].done:
            if self._diverged_at is not None:
                rank_zero_warn(f"{_DIVERGED.format(step=self._diverged_at)} No responses were simulated.")
            else:
                rank_zero_warn(
                    "The fit ended before the final simulation window opened: its responses were not simulated. "
                    f"Train longer (at least one epoch + horizon={self.horizon} steps) or use mode='end'."
                )
        for window in self._windows:
            if window.simulation is not None and not window.done:
                if stopped_by is None:
                    self._finish_on_replay(trainer, pl_module, window)
                self._write_window(trainer, pl_module, window, stopped_by)

    def _finish_on_replay(self, trainer: L.Trainer, pl_module: L.LightningModule, window: _Window) -> None:
        """Propagates what is still live when the fit ends for its remaining steps, at the final weights,
        on batches replayed from the training set (at most ``horizon`` of them)."""
        simulation = window.simulation
        steps = int(simulation.remaining.max()) if simulation.num_live else 0  # finish() adds the last increments
        if steps == 0:
            return
        start = time.perf_counter()
        with functional_view(pl_module, self._space) as (model, theta):
            for batch in self._replay_batches(trainer, model, theta, self.curvature_batch_size, steps):
                operator = curvature_operator(self.curvature, model, theta, [batch], self.chunk_size)
                self._ensure_rule(simulation, operator, theta)
                before = simulation.products
                simulation.step(operator)
                self._count(window, simulation.products - before)
        window.replayed_steps = steps
        self._seconds += time.perf_counter() - start

    def _replay_batches(self, trainer: L.Trainer, model: Any, theta: Tensor, batch_size: int, count: int) -> list:
        """``count`` shuffled training batches (private generator, finite examples only), on ``theta``'s device."""
        loader = trainer.train_dataloader
        generator = torch.Generator().manual_seed(self.seed + 1)
        shuffled = DataLoader(
            loader.dataset, batch_size, shuffle=True, generator=generator, collate_fn=loader.collate_fn,
            drop_last=len(loader.dataset) >= batch_size,
        )  # fmt: skip
        batches = [
            _to_simulation(split_batch(b, self.index_key)[0], theta.device)
            for b in itertools.islice(_cycle(shuffled), count)
        ]
        batches = self._finite(model, theta, batches)
        if not batches:
            raise RuntimeError(
                f"{_DIVERGED.format(step=trainer.global_step)} Every replayed training example has a non-finite "
                "loss at the final weights, so no responses can be simulated."
            )
        return batches

    def _write_window(
        self, trainer: L.Trainer, pl_module: L.LightningModule, window: _Window, stopped_by: str | None = None
    ) -> None:
        source_map, simulation = self._source_map, window.simulation
        missing = ~simulation.injected.cpu() & source_map.in_training_set
        responses = simulation.finish(source_map.training_set_size)
        shortfall = simulation.shortfall.cpu()
        missing_per_source = torch.bincount(source_map.example_to_source[missing], minlength=source_map.num_sources)
        if int(missing.sum()) or int((shortfall > 0).sum()):
            rank_zero_warn(
                f"Window {window.name!r}: {int(missing.sum())} training examples were never injected and "
                f"{int((shortfall > 0).sum())} sources were propagated for fewer than {self.horizon} steps; both are "
                "recorded per source in the store, and those sources score NaN."
            )
        stats = {"valid": simulation.valid.cpu(), "shortfall": shortfall, "missing_examples": missing_per_source}
        _warn_invalid(stats["valid"])
        self._write(
            trainer, pl_module, window.name, responses, simulation.rule, stats, window.replayed_steps, stopped_by
        )
        if window.progress is not None:
            window.progress.close()
        window.done, window.simulation, window.progress = True, None, None

    def _simulate_at_current_weights(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        if trainer.is_global_zero:
            start = time.perf_counter()
            simulate = self._eigen_responses if self.codec == "eigen" else self._end_mode_responses
            responses, rule, finite, products = simulate(trainer, pl_module, name)
            self._products += products
            self._seconds += time.perf_counter() - start
            stats = {
                "valid": finite.cpu(),
                "shortfall": torch.zeros(self._source_map.num_sources, dtype=torch.long),
                "missing_examples": torch.zeros(self._source_map.num_sources, dtype=torch.long),
            }
            _warn_invalid(stats["valid"])
            self._write(trainer, pl_module, name, responses, rule, stats)
        trainer.strategy.barrier()

    def _end_mode_responses(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str):
        generator = torch.Generator().manual_seed(self.seed)
        source_map = self._source_map
        with functional_view(pl_module, self._space) as (model, theta):
            batches = self._training_set_in_order(trainer, theta.device)
            u0, finite = initial_perturbations(
                model, theta, batches, source_map.example_to_source, source_map.num_sources
            )
            replay = self._replay_batches(trainer, model, theta, self.curvature_batch_size, self.horizon)
            operators = [curvature_operator(self.curvature, model, theta, [b], self.chunk_size) for b in replay]
            rule = estimate_step_rule(
                operators[0], theta.numel(), self.damping, self.step_size, self.damping_scale, generator, theta.device,
                self._propagation(), self.momentum,
            )
            progress = self._new_progress(trainer, name)
            operators = [CountingOperator(op, progress) for op in operators]
            responses = simulate_responses(u0, operators, rule, source_map.training_set_size, self.chunk_size)
            progress.close()
        return responses, rule, finite, source_map.num_sources * self.horizon

    def _eigen_responses(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str):
        """Codec ``"eigen"`` at the current weights: the top-``rank`` eigenspace of the GGN over the whole training
        set, then each source's damped coordinates in it (one pass of per-source gradients)."""
        source_map = self._source_map
        with functional_view(pl_module, self._space) as (model, theta):
            batches = list(self._training_set_in_order(trainer, theta.device))
            curvature = self._finite(model, theta, [data for data, _ in batches])
            if not curvature:
                raise RuntimeError("Every training example has a non-finite loss; cannot compute the curvature.")
            block, finite, info = eigen_responses(
                model, theta, batches, curvature, source_map.example_to_source, source_map.num_sources,
                source_map.training_set_size, rank=self.rank, damping=self.damping, damping_scale=self.damping_scale,
                horizon=self.horizon, chunk_size=self.chunk_size, momentum=self.momentum,
                # its eigenspace comes from products over the whole training set: exact curvature
                propagation="chebyshev" if self.propagation == "auto" else self.propagation,
                generator=torch.Generator().manual_seed(self.seed),
            )  # fmt: skip
        return block, info, finite, info["curvature_products"]

    def _training_set_in_order(self, trainer: L.Trainer, device: torch.device) -> Iterator[tuple[Any, Tensor]]:
        """The training set once, in order, in batches of ``curvature_batch_size``: ``(data, example index
        LongTensor[B])`` with the data on the simulation's device in fp32 (:func:`_to_simulation`)."""
        loader = trainer.train_dataloader
        sequential = DataLoader(loader.dataset, batch_size=self.curvature_batch_size, collate_fn=loader.collate_fn)
        for batch in sequential:
            data, index = split_batch(batch, self.index_key)
            yield _to_simulation(data, device), index

    def _write(
        self, trainer, pl_module, name, responses: Any, rule: StepRule | dict, stats: dict[str, Tensor], replayed: int = 0,
        stopped_by: str | None = None,
    ) -> None:
        """Writes a response checkpoint. Sources without a complete response are stored as NaN rows (so no
        reader can take them for a zero response); ``stopped_by`` marks a partial checkpoint. ``responses``:
        ``Tensor[S, P]`` or a codec block; ``rule``: the step rule, or (codec ``"eigen"``) the spectral settings."""
        if not trainer.is_global_zero or self._store is None:
            return
        rows = responses if isinstance(responses, Tensor) else responses.coordinates  # eigen: [S, k]
        rows[~complete_sources(stats).to(rows.device)] = float("nan")
        with torch.no_grad():
            theta = self._space.current(pl_module)
        info = {
            "epoch": trainer.current_epoch, "global_step": trainer.global_step, "mode": self.mode,
            "horizon": self.horizon, "curvature": self.curvature,
            **({"step_rule": rule.to_json()} if isinstance(rule, StepRule) else {"spectral": rule}),
            "curvature_products": self._products, "simulation_seconds": round(self._seconds, 3),
            "n_valid": int(stats["valid"].sum()), "n_shortfall": int((stats["shortfall"] > 0).sum()),
            "n_missing_examples": int(stats["missing_examples"].sum()), "replayed_steps": replayed,
            "complete": stopped_by is None, "stopped_by": stopped_by, "batch_format": self._batch_format,
        }  # fmt: skip
        self._store.add_checkpoint(
            name, theta, responses, info=info, source_stats=stats, dtype=self.store_dtype
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": self.dirpath, "products": self._products, "seconds": self._seconds,
            "windows": {
                w.name: "done" if w.done else w.simulation.state_dict() for w in self._windows
                if w.done or w.simulation is not None
            },
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict
        if self._default_dirpath:  # a resumed fit continues the store it started, wherever the default put it
            self.dirpath = state_dict.get("dirpath") or self.dirpath
        self._products, self._seconds = state_dict["products"], state_dict["seconds"]


@dataclass
class _Window:
    """One online simulation: sources injected during ``injection_epoch`` (0-based), written as ``name``."""

    name: str
    injection_epoch: int
    simulation: OnlineSimulation | None = None
    complete: bool = False  # every source propagated for the full horizon
    replayed_steps: int = 0  # steps run on replayed batches after the fit
    progress: SimulationProgress | None = None
    done: bool = False  # written to the store

    def active(self, epoch: int) -> bool:
        return not (self.done or self.complete) and epoch >= self.injection_epoch


_AUTO_BUDGET = 100  # checkpoint_epochs="auto": propagation steps per source for all windows together ...
_AUTO_MAX_CHECKPOINTS = 3  # ... with at most this many windows besides the final one ...
_AUTO_SPAN = 0.5  # ... spread evenly over this last fraction of the epochs before the final one


def auto_checkpoint_count(horizon: int) -> int:
    """Checkpoints besides the final one under ``checkpoint_epochs="auto"``: as many as keep the simulation
    within ``_AUTO_BUDGET = 100`` steps per source in all (one window at the former default horizon 100),
    at most 3: 3 at ``horizon <= 25``, 1 at 50, none at 100."""
    return max(0, min(_AUTO_MAX_CHECKPOINTS, _AUTO_BUDGET // horizon - 1))


def spread_checkpoint_epochs(last: int, count: int = _AUTO_MAX_CHECKPOINTS, span: float = _AUTO_SPAN) -> list[int]:
    """``count`` epochs (0-based, distinct, sorted) spread evenly over ``[(1 - span) * last, last)``: where
    ``checkpoint_epochs="auto"`` puts the extra checkpoints when the final one is at epoch ``last``.
    E.g. ``last=24``: ``[12, 16, 20]``. Fewer when the fit is too short to tell them apart."""
    points = {round(last * (1 - span * k / count)) for k in range(1, count + 1)}
    return sorted(e for e in points if 0 <= e < last)


def _steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps in one epoch (gradient accumulation counted)."""
    return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)


def _training_examples(trainer: L.Trainer) -> tuple[int, Tensor | None]:
    """``(n, members)``: the range ``n`` of the example indices and, for a ``Subset`` of an
    :class:`IndexedDataset` (``random_split``), the ``LongTensor[m]`` indices it holds (``None``: all ``n``).
    The dataset must be one of those: class labels would otherwise pass for example indices."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    found = indexed_base(dataset)
    if found is None:
        raise MisconfigurationException(
            f"The training dataset is a {type(dataset).__name__}, not an IndexedDataset (or a Subset of one): wrap "
            "it as IndexedDataset(dataset) so batches carry example indices. If your batches already carry "
            "the example index, pass num_examples=len(train_set) to say so."
        )
    base, members = found
    whole = members.numel() == len(base) and bool((members == torch.arange(len(base))).all())
    return len(base), None if whole else members


def _default_dirpath(trainer: L.Trainer, overwrite: bool) -> str:
    """``responses`` in Hydra's run directory (inside a Hydra app) or the trainer's log directory; if that
    already holds a store and ``overwrite`` is off, the first free ``responses_v1``, ``responses_v2``, ..."""
    from hydra.core.hydra_config import HydraConfig

    base = None
    if HydraConfig.initialized():  # None under the compose API
        base = HydraConfig.get().runtime.get("output_dir")
    base = base or trainer.log_dir or trainer.default_root_dir
    path, version = os.path.join(base, "responses"), 0
    while has_store(path) and not overwrite:
        version += 1
        path = os.path.join(base, f"responses_v{version}")
    if version:
        rank_zero_info(f"lightning_attr: {os.path.join(base, 'responses')} holds an earlier store; writing to {path}")
    return path


def _to_simulation(data: Any, device: torch.device) -> Any:
    """A batch on the simulation's device with floating tensors in fp32 (the simulation runs in fp32)."""
    return to_float32(move_data_to_device(data, device))


def _warn_invalid(valid: Tensor) -> None:
    if not bool(valid.all()):
        bad = (~valid).nonzero().squeeze(1)
        rank_zero_warn(
            f"{bad.numel()} sources had non-finite gradients or responses (first: {bad[:5].tolist()}); they are "
            "stored as invalid and score NaN. Check those examples and the loss for NaN/inf."
        )


def _cycle(loader: DataLoader):
    while True:
        yield from loader
