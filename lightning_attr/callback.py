"""AttributionCallback: simulates per-source parameter responses while a Lightning fit runs.

The callback is glue: the maths lives in :mod:`simulation` / :mod:`curvature`, the files in
:mod:`store`. See METHOD.md for what a response is and how it is read out.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_attr import batch_format
from lightning_attr.engine import DIVERGED, SimulationEngine, SourcePartition, TrainingData, Window, checkpoint_owners
from lightning_attr.factored import example_rows, factor_layers, factored_numbers
from lightning_attr.functional import functional_view, to_float32, uses_output_loss
from lightning_attr.mixin import AttributionMixin
from lightning_attr.parameters import ParameterSpace
from lightning_attr.progress import SimulationProgress
from lightning_attr.settings import AttributionSettings
from lightning_attr.curvature_average import DEFAULT_AVERAGED_RANK
from lightning_attr.simulation import DEFAULT_MOMENTUM, Damping
from lightning_attr.sources import SourceMap, SourceSpec, indexed_base, split_batch
from lightning_attr.store import ResponseStore, has_store

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
        damping: ``"auto"`` (:mod:`lightning_attr.damping`: with the eigenspace of ``propagation="spectral"`` and
            codec ``"eigen"``, ``damping_scale x max(0.27 sigma_64, trace(G)/P)``, ``sigma_64`` the 64th eigenvalue of the
            full-data GGN; with a step rule, ``damping_scale x 3 trace(G)/P``, from 32 Hutchinson probes) or a float
            ``lambda``.
        curvature: ``"ggn"`` (needs ``attribution_outputs``) or ``"hessian"``.
        mode: ``"end"`` (default): after the fit (and after each ``checkpoint_epochs`` entry), at fixed weights:
            with ``propagation="spectral"`` (the default there) the damped inverse in the top eigenspace of the
            full-data GGN; with a step rule, ``horizon`` products on batches of ``curvature_batch_size`` replayed
            from the training set with a private generator. ``"online"``: propagate on the live batches and
            parameters of the last epoch(s) of the fit (sources are injected during the epoch that ends
            ``horizon`` propagation steps before the end of the fit, see ``curvature_batch_size``; what is still
            live when a fit ends early is finished on replayed batches at the final weights). End mode simulates the
            examples the fit trained on (that some training batch held, on any process, before the checkpoint; kept in
            the callback's state for resume): where the train loader's sampler covers part of the dataset
            (``SubsetRandomSampler``, ``drop_last=True`` without shuffling), the curvature, ``n`` and each source's
            gradient are over its trained examples, a source none of whose examples was trained on scores NaN
            (``missing_examples`` in the store, as online mode's examples never injected) and one warning says how many;
            a group source that lost some of its examples is scored as the removal of those trained on
            (:meth:`SimulationEngine._trained_on <lightning_attr.engine.SimulationEngine._trained_on>`).
        sources: ``None`` for one source per training example, or each example's source id (``Tensor[n]``
            or a sequence of ints/strings), or a callable mapping ``LongTensor[n]`` example indices to ids.
        checkpoint_epochs: extra response checkpoints along the trajectory (1-based epoch numbers), read with the
            final one as a trajectory ensemble (``attribute(checkpoints="all")``, the default). ``"auto"`` (default):
            where the simulation runs at fixed weights (end mode; also codec ``"eigen"``), 2 after 10% and 20% of the
            epochs (:func:`early_checkpoint_epochs`; 30 epochs: after 3 and 6; early members add the most, measured
            in ``benchmarks/ensembles.py``); on live batches (online mode), none (no measurement shows online windows
            gaining from an ensemble, and each window costs a full simulation); a fit whose end
            is unknown (no ``max_epochs`` / ``max_steps``), none, with a warning. ``None``: the final checkpoint
            only. A list: online, one more simulation window per entry, injecting during that epoch, written
            ``horizon`` steps later with the weights of that moment; end, an end-mode simulation at the weights
            after that epoch (on several processes, after the fit: each of those checkpoints on one process alone
            while every process gets one, :func:`~lightning_attr.engine.checkpoint_owners`). An entry the fit cannot honour (too late for a window to finish before the end) is
            dropped with a warning.
        curvature_batch_size: examples per curvature batch. ``mode="end"``: the replayed batches. Online:
            consecutive live batches are pooled until they hold this many examples (at most the training set),
            and each pool is one propagation step at the weights of the step that completes it, so a window
            takes ``horizon * ceil(curvature_batch_size / batch_size)`` optimizer steps. Larger pools mean less
            sampling noise in the curvature, which the accelerated rules amplify (``docs/propagation.md``).
        step_size: ``"auto"`` (``1 / (2 lambda_max + lambda)``, ``lambda_max`` by 20 power iterations) or a float.
            The accelerated rules take ``[lambda, 1/step_size]`` as the spectrum of ``G + lambda I``.
        propagation: how each perturbation is turned into a response. ``"auto"``: ``"spectral"`` in end mode with
            the GGN, else ``"heavy_ball"`` (``"chebyshev"`` in end mode with the Hessian and ``curvature_batch_size >= n``);
            what was used is recorded in each checkpoint's ``step_rule``. ``"spectral"`` (end mode, GGN;
            :mod:`lightning_attr.deflated`): the damped inverse applied exactly in the top-``rank`` eigenspace of the
            full-data GGN (block Krylov, the training set in batches of ``curvature_batch_size``) and by
            ``1/(mu + damping)`` outside it (``mu`` its mean eigenvalue there); its cost does not grow with the number of
            sources and ``horizon`` does not apply; a warning says when the ``rank``-th eigenvalue exceeds the damping
            (raise ``rank``). The step rules (:mod:`lightning_attr.simulation`, ``horizon`` products per source):
            ``"heavy_ball"`` (steps ``step_size`` with momentum ``momentum``; measured best on minibatch
            curvature), ``"neumann"`` (plain damped steps, ``O(kappa)`` products to converge) or
            ``"chebyshev"`` (Chebyshev semi-iteration, ``O(sqrt(kappa))`` with exact curvature, e.g. end mode
            with ``curvature_batch_size >= n``; it amplifies minibatch noise).
        momentum: heavy-ball's ``beta`` in ``[0, 1)``: curvature below ``(1 - beta)/step_size`` is resolved as
            if the step were ``step_size / (1 - beta)``.
        averaged_rank: online mode with the GGN: inside the top-``k`` eigenspace of a window's first curvature pool,
            each pool's curvature is replaced by the running mean of the window's pools so far
            (:mod:`lightning_attr.curvature_average`; ``k`` products per pool, less minibatch noise;
            docs/propagation.md). 0: off.
        damping_scale: multiplies the automatic damping's ``lambda`` (default 1: the rules' factors were measured,
            ``benchmarks/results/damping-rules.md``; README, "Damping").
        chunk_size: perturbations per vmapped curvature product (bounds the product's activation memory).
        memory_budget_mb: bounds the simulation's ``[C, P]`` blocks (README, "Memory"): end mode simulates
            ``C = floor(memory_budget_mb * 2**20 / (28 P))`` sources at a time and writes each block's shard as soon
            as it is done; online, retired sources go to shards of at most ``C`` rows. ``S x P`` is never held.
        store_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage of responses. Codecs ``"dense"``,
            ``"lorif"`` and ``"factored"`` store either half dtype as float16 scaled by a power of two per source (and
            factor column), the factored basis in float16 (:mod:`~lightning_attr.half_precision`: a plain float16 cast
            flushed small responses to zero; bfloat16 keeps 3 fewer bits, and the factored response cancels them).
        num_examples: the range ``n`` of the example indices when the batches carry their own index column (the
            training dataset is not an :class:`IndexedDataset`); beside an ``IndexedDataset`` (or a ``Subset`` of one)
            it must be that dataset's length, and the sources are its members.
        index_key: the key of the example index in dict batches (``IndexedDataset`` over dict items puts it
            there); tuple batches carry it last. ``attribution_outputs`` receives the batch without it.
        seed: seed of the callback's private generator (probes, replay order). The global RNG is never drawn.
        overwrite: replace a store already in ``dirpath`` (otherwise that is an error).
        codec: ``"auto"``: ``"dense"`` while one checkpoint's dense responses (``4 S P`` bytes) fit 1 GiB
            (``attribute()``'s default memory budget, within which a member is read from memory), ``"eigen"``
            beyond it in end mode with ``curvature="ggn"`` (``"dense"`` otherwise); resolved when the fit starts
            and recorded in the manifest (:func:`lightning_attr.codecs.auto_codec`).
            ``"dense"``: one ``P``-float response per source (simulated as above). ``"eigen"``: at the end of
            the fit (and after each ``checkpoint_epochs`` entry), the top-``rank`` eigenspace of the full-data GGN
            (randomized range finder over the training set in batches of ``curvature_batch_size``) and ``rank``
            coordinates per source of the response in it (:mod:`spectral`): the dense simulation's ``horizon``-step
            Neumann series applied exactly per eigen-direction (``horizon=10**6``: the damped inverse); ``mode``
            and ``step_size`` do not apply. Its readout costs ``rank`` forward-mode tangents per query batch,
            whatever the number of sources, and offers only ``readout="linear"``.
            ``"lorif"``: simulated as ``"dense"`` (either mode), each source's response to every Linear / Conv weight
            kept as rank-``rank`` factors ``U (out x c)``, ``V (in x c)`` (truncated SVD), the other parameters
            dense (:mod:`lowrank`); read out with ``U (V^T x)`` added to the layer's output (every readout).
            ``"factored"`` (end mode, GGN, ``propagation="spectral"``): the spectral default's responses exactly, as
            the ``rank`` eigen coordinates of the damped inverse's correction plus ``g_s / (mu + damping)`` with each
            Linear / Conv1d / Conv2d weight's gradient kept as its per-example factors ``sum_t delta_t x_t^T`` (rank:
            its output rows, a convolution's positions, times the source's examples) where smaller, and the rest dense
            (:mod:`factored`): ``k + sum_l c (out + in)`` numbers per source; the same scores as
            ``"dense"`` up to float rounding (``central`` / ``step`` rebuild dense rows: the dense cost).
        rank: ``k``, eigenpairs kept by ``codec="eigen"`` and by ``propagation="spectral"`` (and so ``"factored"``; capped at ``P``); ``c``, the rank of every factored
            weight for ``codec="lorif"`` (capped at ``min(out, in)``: exact there). ``"auto"``: ``propagation="spectral"``
            grows its Krylov space block by block (nothing recomputed) from rank 256 until ``sigma_k <= 0.5 damping``,
            at most ``floor(memory_budget_mb * 2**20 / (20 P))`` curvature products (the finder's memory; never fewer
            than rank 256 spends), and warns when that cap stops it; the rank reached, why it stopped, ``sigma_k /
            damping`` and the products are in ``step_rule``. The codecs take 256 for ``"auto"``.
        sketch: ``codec="eigen"`` only: ``k'`` more numbers per source, a random sketch of each response's part
            outside the top-``rank`` eigenspace (``p(mu) (I - V^T V) grad l_b / n``, ``mu`` the mean eigenvalue
            there: the complement term of ``propagation="spectral"``), read out along ``k'`` more tangents. 0: that
            part is dropped.

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
        mode: str = "end",
        sources: SourceSpec = None,
        checkpoint_epochs: Sequence[int] | str | None = "auto",
        curvature_batch_size: int = 256,
        step_size: Damping = "auto",
        propagation: str = "auto",
        momentum: float = DEFAULT_MOMENTUM,
        averaged_rank: int = DEFAULT_AVERAGED_RANK,
        damping_scale: float = 1.0,
        chunk_size: int = 2048,
        store_dtype: str = "float32",
        num_examples: int | None = None,
        index_key: str = "index",
        seed: int = 0,
        overwrite: bool = False,
        codec: str = "auto",
        rank: int | str = "auto",
        sketch: int = 0,
        memory_budget_mb: float = 1024.0,
    ) -> None:
        options = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        try:
            self.settings = AttributionSettings(**options)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        for name, value in self.settings.to_manifest().items():
            setattr(self, name, value)
        self.dirpath, self.sources, self.overwrite = self.settings.dirpath, sources, overwrite
        self._default_dirpath = dirpath is None  # resolved in setup, restored on resume
        self._reset()

    def _reset(self) -> None:
        self._store: ResponseStore | None = None
        self._source_map: SourceMap | None = None
        self._space: ParameterSpace | None = None
        self._engine: SimulationEngine | None = None
        self._end_epochs: list[int] = []
        self._deferred: list[_Weights] = []  # end mode on several processes: checkpoint epochs simulated after the fit
        self._pending: list[tuple[Any, Tensor]] = []  # this step's live batches (online)
        self._last_step = -1
        self._fit_start = 0.0
        self._restored: dict[str, Any] | None = None
        self._batch_format: dict | None = None  # the training batches' format, checked against queries
        self._trained: Tensor | None = None  # BoolTensor[n]: the examples this process's training batches held so far

    @property
    def _products(self) -> int:
        """Curvature-vector products this process has run in the fit (all windows / checkpoints)."""
        return 0 if self._engine is None else self._engine.products

    @property
    def _seconds(self) -> float:
        """Seconds this process has spent simulating in the fit."""
        return 0.0 if self._engine is None else self._engine.seconds

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, mode=self.mode, horizon=self.horizon)

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
        if self.dirpath is None:
            self.dirpath = _default_dirpath(trainer, self.overwrite) if trainer.is_global_zero else None
        self.dirpath = trainer.strategy.broadcast(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        n, members = _training_examples(trainer, self.num_examples)
        self._source_map = SourceMap.build(self.sources, n, members)
        self._trained = self._restored_trained(n)
        self._space = ParameterSpace.of(pl_module)
        rank = self.settings.fixed_rank()  # "auto": the eigenspace's first 256 pairs (it may grow beyond)
        per_example = self._source_map.is_per_example
        numbers = factored_numbers(pl_module, self._space, rank, self._example_rows(trainer, pl_module)) if per_example else None
        self.settings = self.settings.for_size(self._source_map.num_sources, self._space.size, numbers)
        self.codec = self.settings.codec
        self._engine = SimulationEngine(
            self.settings, self._source_map, self._space, self.dirpath,
            SourcePartition(trainer.global_rank, trainer.world_size),
            progress=lambda name, total: SimulationProgress(trainer, f"attribution ({name})", total), warn=rank_zero_warn,
            reduce_sum=_sum_over_processes(trainer),
        )  # fmt: skip
        if self._restored is not None:
            self._engine.products, self._engine.seconds = self._restored["products"], self._restored["seconds"]
            self._engine.cpu_seconds = self._restored.get("cpu_seconds", 0.0)
            open_windows = [n for n, w in self._restored.get("windows", {}).items() if isinstance(w, dict)]
            if open_windows and trainer.world_size > 1:
                raise MisconfigurationException(
                    f"The checkpoint was taken inside the simulation window(s) {open_windows}; a fit on "
                    f"{trainer.world_size} processes cannot resume there (the checkpoint holds rank zero's sources "
                    "only). Resume from a checkpoint taken before the window opened, or on one process."
                )
        if self._online:
            self._engine.plan(self._plan_windows(trainer), self._restored)
        else:
            self._end_epochs = self._plan_end_checkpoints(trainer)
            self._deferred = [_Weights(**w) for w in (self._restored or {}).get("deferred", [])]
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
                    self.dirpath, self._space, self._source_map, self.settings.to_manifest(), overwrite=True
                )
        trainer.strategy.barrier()

    def _restored_trained(self, n: int) -> Tensor:
        """``BoolTensor[n]``: the examples trained on before this fit started: none, or those a resumed fit's state
        recorded (a state without the record, from an older version: every example, as that version assumed)."""
        if self._restored is None:
            return torch.zeros(n, dtype=torch.bool)
        trained = self._restored.get("trained")
        if trained is None or trained.shape != (n,):
            return torch.ones(n, dtype=torch.bool)
        return trained.bool().cpu().clone()

    def _trained_by_every_process(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """``BoolTensor[n]``: the examples some process's training batches held (each process sees its own batches;
        summed over the processes by the strategy's all-reduce, so every process must call it)."""
        if trainer.world_size == 1:
            return self._trained
        counts = self._trained.to(pl_module.device, torch.float32)
        return _sum_over_processes(trainer)(counts).cpu() > 0

    def _example_rows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int] | None:
        """For ``codec="auto"``'s count (:func:`~lightning_attr.factored.factored_numbers`) in end mode: the rows per
        example of each layer codec ``"factored"`` could factor (a convolution's output positions), read from the
        training set's first example (:func:`~lightning_attr.factored.example_rows`); ``None`` (Linear layers once
        per example, convolutions dense) for another codec or mode, or a network without a convolution to factor."""
        if self.settings.codec != "auto" or self.settings.mode != "end":
            return None
        if all(isinstance(layer.module, torch.nn.Linear) for layer in factor_layers(pl_module, self._space)):
            return None
        with functional_view(pl_module, self._space) as (model, theta):  # the RNG forked: training draws the same
            probe, _ = next(self._training_data(trainer, theta.device).in_order(1))
            return example_rows(model, theta, probe)

    @property
    def _online(self) -> bool:
        """Whether responses are simulated on the live batches (``mode="online"``, codec ``"dense"`` or ``"lorif"``)."""
        return self.mode == "online" and self.codec != "eigen"

    def _plan_windows(self, trainer: L.Trainer) -> list[tuple[str, int]]:
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
        requested = [] if self.checkpoint_epochs == "auto" else self.checkpoint_epochs
        epochs = [e for e in requested if e - 1 < final]
        dropped = [e for e in requested if e - 1 >= final]
        if dropped:
            latest = f"the latest possible is {final}" if final >= 1 else "no epoch is early enough"
            rank_zero_warn(
                f"checkpoint_epochs {dropped} cannot be honoured and were dropped: a window injecting during "
                f"epoch e ends one epoch + horizon steps later and must open before the final window (epoch "
                f"{final + 1}); {when}, {latest}. Use earlier epochs, train longer, lower horizon, or "
                "mode='end' (checkpoints at the weights after any epoch)."
            )
        return [*((f"epoch={e}", e - 1) for e in epochs), ("final", final)]

    def _plan_injection_epoch(self, trainer: L.Trainer) -> tuple[int, int]:
        """``(epoch the final window injects during (0-based), optimizer steps per epoch)``."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise MisconfigurationException(
                "mode='online' must know when the fit ends: set max_epochs or max_steps, or use mode='end'."
            )
        # The last epoch that ends at least `horizon` steps before the fit does: every source is injected
        # once and fully propagated on live batches. A fit too short for that (or stopped early) finishes
        # the remaining steps on replayed batches at the end (SimulationEngine.finish_on_replay).
        per_epoch = _steps_per_epoch(trainer)
        return max(0, (int(total) - self._window_steps(trainer)) // per_epoch - 1), per_epoch

    def _window_steps(self, trainer: L.Trainer) -> int:
        """Optimizer steps that ``horizon`` online propagation steps take: each propagates on a pool of live
        batches holding at least ``curvature_batch_size`` examples."""
        return self.horizon * self._steps_per_pool(trainer)

    def _steps_per_pool(self, trainer: L.Trainer) -> int:
        """Optimizer steps whose live batches make one online curvature batch of ``curvature_batch_size`` (the
        batches of every process are pooled)."""
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        if not batch_size:
            return 1
        per_step = batch_size * trainer.accumulate_grad_batches * trainer.world_size
        return max(1, math.ceil(self._pool_size() / per_step))

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
                rank_zero_warn(
                    "checkpoint_epochs='auto' puts checkpoints after 10% and 20% of the epochs and the fit's end is "
                    "unknown (no max_epochs / max_steps): only the final checkpoint is simulated. Set max_epochs or "
                    "max_steps, or list the epochs (checkpoint_epochs=[...])."
                )
                return []
            return early_checkpoint_epochs(last)
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
        self._trained[index.cpu()] = True  # end mode simulates the examples trained on (SimulationEngine._trained_on)
        if self._engine.active(trainer.current_epoch):
            self._pending.append((data, index))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._pending or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        pending, self._pending = self._pending, []
        if trainer.world_size > 1:  # every process needs every live batch: the pooled curvature, the injections
            with self._engine.timed("collectives"):
                pending = [_all_gathered(trainer, batch) for batch in pending]
        with functional_view(pl_module, self._space) as (model, theta):
            batches = [(_to_simulation(d, theta.device), i) for d, i in pending]
            finished = self._engine.on_optimizer_step(
                model, theta, batches, trainer.current_epoch, trainer.global_step, self._pool_size()
            )
        for window in finished:  # a checkpoint window is complete: write it with the weights it ended at
            self._close_window(trainer, pl_module, window)

    def _training_data(self, trainer: L.Trainer, device: torch.device) -> TrainingData:
        loader = trainer.train_dataloader
        return TrainingData(loader.dataset, loader.collate_fn, self.index_key, device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        live = self._engine.live()
        if live:  # the progress bar shows these (SimulationProgress); loggers get them here
            pl_module.log("attribution/curvature_products", float(self._engine.products), on_step=True)
            pl_module.log("attribution/seconds", self._engine.seconds, on_step=True)
            pl_module.log("attribution/live", float(sum(s.num_live for s in live)), on_step=True)

    # ------------------------------------------------------------------ checkpoints
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not self._online and trainer.world_size > 1:  # in the state a checkpoint saves (rank zero's): every process's
            self._trained = self._trained_by_every_process(trainer, pl_module)
        if not self._online and epoch in self._end_epochs and epoch != trainer.max_epochs:
            weights = _Weights.now(trainer, pl_module, self._space, f"epoch={epoch}")
            if trainer.world_size > 1:  # simulated after the fit, by one process alone (_simulate_end_checkpoints)
                self._deferred.append(weights)
            else:
                self._simulate(trainer, pl_module, weights, trained=self._trained)
                self._commit(trainer, weights)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._online:
            self._simulate_end_checkpoints(trainer, pl_module)
        else:
            self._write_open_windows(trainer, pl_module)
        fit_seconds = time.perf_counter() - self._fit_start
        products, seconds = _fit_totals(trainer, pl_module, self._engine)
        where = f" on {trainer.world_size} processes (seconds: the slowest)" if trainer.world_size > 1 else ""
        rank_zero_info(
            f"lightning_attr: {self._source_map.num_sources} sources, {products} curvature-vector products "
            f"in {seconds:.1f}s{where} ({100 * seconds / max(fit_seconds, 1e-9):.0f}% of the fit's "
            f"{fit_seconds:.1f}s) -> {self.dirpath}"
        )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._engine is not None and not self._online:
            written = self._store.checkpoints if self._store is not None else []
            deferred = [w.name for w in self._deferred]
            rank_zero_warn(
                f"The fit stopped ({type(exception).__name__} at global step {trainer.global_step}) before the end-mode "
                f"simulation at the final weights: no 'final' checkpoint was written"
                + (f" (nor {deferred}: on several processes they are simulated after the fit)" if deferred else "")
                + f"; the store in {self.dirpath} keeps the checkpoints it listed before ({written or 'none'}), which "
                "describe earlier weights. Re-run the fit."
            )
            return
        if self._engine is None or not self._engine.live():
            return
        stopped_by = f"{type(exception).__name__} at global step {trainer.global_step}"
        if trainer.world_size > 1:
            rank_zero_warn(
                f"The fit stopped ({stopped_by}) on {trainer.world_size} processes: the open simulation windows are not "
                "written (the processes cannot agree on a partial checkpoint after a failure); the store keeps the "
                "checkpoints it listed before. Re-run the fit."
            )
            return
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
        windows = self._engine.windows
        if windows and windows[-1].simulation is None and not windows[-1].done:
            if self._engine.diverged_at is not None:
                rank_zero_warn(f"{DIVERGED.format(step=self._engine.diverged_at)} No responses were simulated.")
            else:
                rank_zero_warn(
                    "The fit ended before the final simulation window opened: its responses were not simulated. "
                    f"Train longer (at least one epoch + horizon={self.horizon} steps) or use mode='end'."
                )
        for window in windows:
            if window.simulation is not None and not window.done:
                if stopped_by is None:
                    with functional_view(pl_module, self._space) as (model, theta):
                        data = self._training_data(trainer, theta.device)
                        self._engine.finish_on_replay(model, theta, data, window, trainer.global_step)
                self._close_window(trainer, pl_module, window, stopped_by)

    def _close_window(
        self, trainer: L.Trainer, pl_module: L.LightningModule, window: Window, stopped_by: str | None = None
    ) -> None:
        self._engine.close_window(window)
        self._commit(trainer, _Weights.now(trainer, pl_module, self._space, window.name), stopped_by)

    def _simulate_end_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """End mode (and codecs ``"eigen"`` / ``"factored"``), after the fit: the final checkpoint and, on several
        processes, the checkpoint epochs deferred to here. Each goes to one process alone while every process gets one
        (:func:`checkpoint_owners`: a trajectory ensemble's members need no collective and no replicated eigenspace
        algebra that way), the rest are shared by all; each checkpoint is committed once its processes are done."""
        checkpoints = [*self._deferred, _Weights.now(trainer, pl_module, self._space, "final")]
        trained = self._trained_by_every_process(trainer, pl_module)
        owners = checkpoint_owners(len(checkpoints), trainer.world_size)
        alone = [(w, owner) for w, owner in zip(checkpoints, owners) if owner is not None]
        for weights, owner in alone:
            if owner == trainer.global_rank:
                self._simulate(trainer, pl_module, weights, alone=True, trained=trained)
        for weights, owner in alone:
            if owner != trainer.global_rank:
                self._engine.skip_checkpoint(weights.name)
            self._commit(trainer, weights)
        for weights, owner in zip(checkpoints, owners):
            if owner is None:
                self._simulate(trainer, pl_module, weights, trained=trained)
                self._commit(trainer, weights)
        self._deferred = []

    def _simulate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, weights: _Weights, alone: bool = False, trained: Tensor | None = None
    ) -> None:  # fmt: skip
        """Simulates this process's sources of a checkpoint (``alone``: every source, :meth:`SimulationEngine.simulate_checkpoint`)
        at ``weights`` (their parameters and buffers); ``trained``: ``BoolTensor[n]``, the examples the fit trained on
        (every process's batches)."""
        with weights.buffers_in(pl_module), functional_view(pl_module, self._space) as (model, _):
            data = self._training_data(trainer, weights.theta.device)
            self._engine.simulate_checkpoint(model, weights.theta, data, weights.name, weights.step, alone=alone, trained=trained)

    def _commit(self, trainer: L.Trainer, weights: _Weights, stopped_by: str | None = None) -> None:
        """After every process wrote its part of checkpoint ``weights.name`` (a barrier), rank zero lists it in the
        manifest; a second barrier lets no process read the store before."""
        trainer.strategy.barrier()
        if trainer.is_global_zero and self._store is not None:
            info = {
                "epoch": weights.epoch, "global_step": weights.step, "mode": self.mode,
                "horizon": self.horizon, "curvature": self.curvature, "complete": stopped_by is None,
                "stopped_by": stopped_by, "batch_format": self._batch_format, "processes": trainer.world_size,
            }  # fmt: skip
            self._engine.commit(self._store, weights.name, weights.theta, info, parts=trainer.world_size)
        trainer.strategy.barrier()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        engine = self._engine
        if engine is None:
            return {"dirpath": self.dirpath, "products": 0, "seconds": 0.0, "windows": {}}
        return {
            "dirpath": self.dirpath, "products": engine.products, "seconds": engine.seconds,
            "cpu_seconds": engine.cpu_seconds, **engine.state_dict(), "deferred": [vars(w) for w in self._deferred],
            "trained": self._trained.clone(),  # this process's; a resumed fit adds its batches to them
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict
        if self._default_dirpath:  # a resumed fit continues the store it started, wherever the default put it
            self.dirpath = state_dict.get("dirpath") or self.dirpath


@dataclass
class _Weights:
    """A checkpoint's weights: its name, parameters ``theta: Tensor[P]`` (float32), the module's buffers (BatchNorm's
    running statistics, ...) and the 0-based epoch and global step they were taken at."""

    name: str
    theta: Tensor
    buffers: dict[str, Tensor]
    epoch: int
    step: int

    @classmethod
    def now(cls, trainer: L.Trainer, module: L.LightningModule, space: ParameterSpace, name: str) -> _Weights:
        with torch.no_grad():
            buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
            return cls(name, space.current(module).clone(), buffers, trainer.current_epoch, trainer.global_step)

    @contextlib.contextmanager
    def buffers_in(self, module: L.LightningModule) -> Iterator[None]:
        """The module holds these buffers inside the block (its own are put back after)."""
        live = dict(module.named_buffers())
        own = {n: live[n].detach().clone() for n in self.buffers}
        with torch.no_grad():
            for n, b in self.buffers.items():
                live[n].copy_(b)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in own.items():
                    live[n].copy_(b)


# checkpoint_epochs="auto" in end mode: after these fractions of the epochs. Early members add the most
# (benchmarks/ensembles.py, 30 epochs, members after epochs 3, 6, 10/13, 15, 20/21, 25 and the final one, one seed):
# each of epochs 3-10 alone beat the final model on both MNIST-1D settings, and {3, 6} + final reached LDS
# 0.709 / 0.813 / 0.266 / 0.322 (digits MLP, [0, 1] digits MLP, MNIST-1D MLP, MNIST-1D CNN) against 0.672 / 0.767 /
# 0.136 / 0.236 for the final model alone, 0.003-0.025 below the best subset of up to 6 members
_AUTO_FRACTIONS = (0.1, 0.2)


def early_checkpoint_epochs(epochs: int) -> list[int]:
    """Where ``checkpoint_epochs="auto"`` puts the extra checkpoints of end mode in a fit of
    ``epochs`` epochs: after epochs ``round(0.1 epochs)`` and ``round(0.2 epochs)`` (1-based, at least 1, before the
    last; distinct). E.g. 30 epochs: ``[3, 6]``; 10: ``[1, 2]``; 5: ``[1]``; 1: ``[]``."""
    return sorted(e for e in {max(1, round(epochs * f)) for f in _AUTO_FRACTIONS} if e < epochs)


def _steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps in one epoch (gradient accumulation counted)."""
    return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)


def _training_examples(trainer: L.Trainer, num_examples: int | None = None) -> tuple[int, Tensor | None]:
    """``(n, members)``: the range ``n`` of the example indices and, for a ``Subset`` of an
    :class:`IndexedDataset` (``random_split``), the ``LongTensor[m]`` indices it holds (``None``: all ``n``).
    The dataset must be one of those (class labels would otherwise pass for example indices), unless ``num_examples``
    says that the batches carry their own index in ``[0, num_examples)``. Beside an :class:`IndexedDataset`,
    ``num_examples`` must be its length, and the members are still read from it: an index the fit never reads would
    be a source that end mode never simulates."""
    dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
    found = indexed_base(dataset)
    if found is None:
        if num_examples:
            return num_examples, None
        raise MisconfigurationException(
            f"The training dataset is a {type(dataset).__name__}, not an IndexedDataset (or a Subset of one): wrap "
            "it as IndexedDataset(dataset) so batches carry example indices. If your batches already carry "
            "the example index, pass num_examples=len(train_set) to say so."
        )
    base, members = found
    if num_examples and num_examples != len(base):
        raise MisconfigurationException(
            f"num_examples={num_examples}, but the training set is an IndexedDataset of {len(base)} examples (or a "
            "Subset of one): the examples it does not hold would be sources that no batch trains on. The callback "
            "reads the example count and the members from the IndexedDataset: leave num_examples unset."
        )
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
    return to_float32(tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, data))


def _sum_over_processes(trainer: L.Trainer) -> Callable[[Tensor], Tensor]:
    """Sums a tensor over the fit's processes (in place; the same sum on every process): ``all_reduce`` on the process
    group the strategy set up. Not ``trainer.strategy.reduce``: Lightning runs a barrier before each of its all-reduces,
    which doubled the collectives of the eigenspace finder (one all-reduce per inner product of its Krylov space)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")

    def reduce_sum(tensor: Tensor) -> Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    return reduce_sum


def _fit_totals(trainer: L.Trainer, pl_module: L.LightningModule, engine: SimulationEngine) -> tuple[int, float]:
    """The fit's curvature-vector products over every process (each tallies its own; a shared checkpoint's on the
    process that writes it) and the slowest process's simulation seconds."""
    if trainer.world_size == 1:
        return engine.products, engine.seconds
    mine = torch.tensor([float(engine.products), engine.seconds], dtype=torch.float64, device=pl_module.device)
    every = trainer.strategy.all_gather(mine).reshape(-1, 2).cpu()
    return int(every[:, 0].sum()), float(every[:, 1].max())


def _all_gathered(trainer: L.Trainer, batch: tuple[Any, Tensor]) -> tuple[Any, Tensor]:
    """``(data, index)`` of every process, concatenated along the batch in rank order (the processes' batches
    have the same size under Lightning's ``DistributedSampler``)."""
    gather = lambda t: trainer.strategy.all_gather(t).flatten(0, 1) if isinstance(t, Tensor) and t.dim() else t  # noqa: E731
    return tree_map(gather, batch)
