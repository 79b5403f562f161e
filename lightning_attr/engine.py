"""SimulationEngine: the response simulation of one process, without Lightning.

The engine owns the work the callback only triggers (STYLE.md: the callback is glue):

- **end mode**: at fixed weights, the owned sources are simulated in blocks of at most
  :meth:`AttributionSettings.block_size` sources (set by ``memory_budget_mb``); each block's gradients,
  propagation and shard are done before the next starts, so ``S x P`` is never held. ``propagation="spectral"``
  (the default there) replaces the step rule by the damped inverse exact in the top-k eigenspace of the
  full-data GGN (:mod:`deflated`), found once per checkpoint;
- **online windows**: sources injected from the live batches of one epoch, propagated on pooled live
  curvature batches, retired to shards as their horizon is spent (:class:`OnlineSimulation`);
  what is still live when the fit ends is finished on replayed batches;
- **codec ``"eigen"``**: the top-k eigenspace and ``k`` coordinates per source (:mod:`spectral`);
- **codec ``"lorif"``**: simulated as dense, each block's responses factored per layer before it is buffered
  (:mod:`lowrank`).

Its swappable parts are passed in (as TRAK passes its gradient computer, projector and saver):

- ``partition``: which sources this process simulates (:class:`SourcePartition`; one block of contiguous
  source ids per process of a distributed fit);
- ``curvature``: ``(model, theta, batches) -> CurvatureOperator`` (default: the GGN or Hessian of
  :mod:`curvature`, chunked);
- the **codec**, ``settings.codec``: ``"dense"`` responses go through a :class:`ShardWriter` as they finish,
  ``"eigen"`` coordinates are written whole.

Each process writes its own shards and a **part** (:func:`write_part`) per checkpoint; whoever coordinates
the processes (the callback: a barrier, then rank zero) calls :meth:`SimulationEngine.commit`, which lists
the checkpoint in the manifest last. Peak memory (README, "Memory"): end mode
``28 P C`` bytes for a block of ``C`` sources plus the vmapped curvature product's activations (``chunk_size``
vectors at a time); online ``~20 P L`` bytes for ``L`` live sources plus one shard buffer.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Subset

from lightning_attr import half_precision
from lightning_attr.allocator import retain_freed_memory
from lightning_attr.column_split import ColumnSplit
from lightning_attr.curvature_average import CurvatureAverage
from lightning_attr.curvature import CurvatureOperator, batch_size_of, curvature_operator, estimate_spectrum, shared_operator
from lightning_attr.damping import eigenspace_damping, resolve_damping, ritz_damping
from lightning_attr.deflated import AUTO_RANK_RATIO, COMPLEMENT_WARNING_RATIO, DeflatedInverse
from lightning_attr.functional import FunctionalModel, to_float32
from lightning_attr.parameters import ParameterSpace
from lightning_attr.phases import PhaseClock
from lightning_attr.settings import AttributionSettings
from lightning_attr.simulation import (
    OnlineSimulation,
    StepRule,
    estimate_step_rule,
    finite_examples,
    finite_loss_mask,
    initial_perturbations,
    propagate,
    select_examples,
)
from lightning_attr.sources import SourceMap, indexed_base, split_batch
from lightning_attr.factored import FactoredResponses, FactorPlan, bias_agreement, check_factors
from lightning_attr.lowrank import LowRankResponses, encode_lowrank, factored_layers, lowrank_entry
from lightning_attr.spectral import DEFAULT_RESIDUAL_TOLERANCE, EigenResponses, TRACE_PROBES, adaptive_eigenspace, eigen_responses, eigenspace_products, product_cap, top_eigenspace
from lightning_attr.store import ResponseStore, ShardWriter, write_part

CurvatureFactory = Callable[[FunctionalModel, Tensor, Sequence[Any]], CurvatureOperator]
_NO_FINITE_EXAMPLE = "Every training example has a non-finite loss; cannot compute the curvature."
DIVERGED = (
    "The training loss diverged: every example's loss was non-finite at global step {step} (a learning rate "
    "too high, or NaN/inf in the data). Fix the training first: attribution explains a trained model."
)


@dataclass(frozen=True)
class SourcePartition:
    """The sources one process simulates: contiguous block ``rank`` of ``world_size`` near-equal blocks."""

    rank: int = 0
    world_size: int = 1

    def owned(self, num_sources: int) -> Tensor:
        """``LongTensor[S_owned]``, ascending."""
        return torch.arange(num_sources * self.rank // self.world_size, num_sources * (self.rank + 1) // self.world_size)

    def mask(self, num_sources: int) -> Tensor:
        """``BoolTensor[S]``: the owned sources."""
        mask = torch.zeros(num_sources, dtype=torch.bool)
        mask[self.owned(num_sources)] = True
        return mask


def checkpoint_owners(count: int, world_size: int) -> list[int | None]:
    """Who simulates each of ``count`` end-mode checkpoints (a trajectory ensemble's members, the final one last) on
    ``world_size`` processes: process ``i mod W`` alone for the first ``count - count mod W`` (every process then has one
    at a time), None (all processes together, :class:`SourcePartition`) for the rest. A checkpoint simulated alone
    costs what it costs on one process, with no collective and no replicated eigenspace algebra, where a shared one
    splits its products and its Krylov algebra but repeats the ``O(m^3)`` Rayleigh-Ritz steps on every process and
    waits on its collectives (README, "DDP")."""
    alone = count - count % world_size if world_size > 1 else 0
    return [i % world_size if i < alone else None for i in range(count)]


class TrainingData:
    """The training set, read again by the simulation: in order, or shuffled with a private generator.

    Args:
        dataset, collate_fn: of the training loader (the sampler is not used: every process reads what it needs).
        index_key: the example index's key in dict batches (tuple batches carry it last).
        device: where batches go; floating tensors become float32 (the simulation runs in fp32).
    """

    def __init__(self, dataset: Any, collate_fn: Callable | None, index_key: str, device: torch.device) -> None:
        self.dataset, self.collate_fn, self.index_key, self.device = dataset, collate_fn, index_key, device
        found = indexed_base(dataset)  # an IndexedDataset (or a Subset of one): the example index of each position
        self._index_of_position = None if found is None else found[1]
        self._only: Tensor | None = None  # BoolTensor[n]: the example indices read (batches carrying their own index)

    def restricted(self, examples: Tensor) -> TrainingData:
        """The training set read as if it held only ``examples`` (``BoolTensor[n]`` over the example indices: those the
        fit trained on). An :class:`IndexedDataset` (or a ``Subset`` of one) becomes the ``Subset`` of those positions,
        read in the same batches as a fit over that subset; batches that carry their own index are filtered."""
        data = TrainingData(self.dataset, self.collate_fn, self.index_key, self.device)
        if self._index_of_position is None:
            data._only = examples if self._only is None else examples & self._only
        else:
            data.dataset = Subset(self.dataset, examples[self._index_of_position].nonzero().squeeze(1).tolist())
            data._index_of_position = self._index_of_position[examples[self._index_of_position]]
        return data

    def __len__(self) -> int:
        return len(self.dataset)

    def _on_device(self, data: Any) -> Any:
        return to_float32(tree_map(lambda t: t.to(self.device) if isinstance(t, Tensor) else t, data))

    def in_order(self, batch_size: int, examples: Tensor | None = None) -> Iterator[tuple[Any, Tensor]]:
        """The training set once, in order: ``(data, example index LongTensor[B])``. ``examples``:
        ``BoolTensor[n]``, keep only those example indices (empty batches are skipped); an :class:`IndexedDataset`
        (or a ``Subset`` of one) then reads those examples alone, in batches of ``batch_size``."""
        dataset = self.dataset
        if self._only is not None:
            examples = self._only if examples is None else examples & self._only
        if examples is not None and self._index_of_position is not None:
            dataset = Subset(dataset, examples[self._index_of_position].nonzero().squeeze(1).tolist())
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=self.collate_fn):
            data, index = split_batch(batch, self.index_key)
            if examples is not None:
                keep = examples[index]
                if not bool(keep.any()):
                    continue
                if not bool(keep.all()):
                    rows = keep.nonzero().squeeze(1)
                    data, index = select_examples(data, rows), index[rows]
            yield self._on_device(data), index

    def shuffled(self, batch_size: int, count: int, seed: int) -> list[Any]:
        """``count`` batches (no index) of a shuffled pass (repeated as needed), from ``Generator(seed)``."""
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            self.dataset, batch_size, shuffle=True, generator=generator, collate_fn=self.collate_fn,
            drop_last=len(self.dataset) >= batch_size,
        )  # fmt: skip
        batches = (split_batch(b, self.index_key) for b in itertools.chain.from_iterable(itertools.repeat(loader)))
        if self._only is not None:  # batches carrying their own index: those the fit trained on (at least one)
            if not bool(self._only.any()):
                return []
            batches = (select_examples(d, keep.nonzero().squeeze(1)) for d, i in batches for keep in [self._only[i]] if keep.any())
        else:
            batches = (d for d, _ in batches)
        return [self._on_device(d) for d in itertools.islice(batches, count)]


@dataclass
class Window:
    """One online simulation: sources injected during ``injection_epoch`` (0-based), written as ``name``."""

    name: str
    injection_epoch: int
    simulation: OnlineSimulation | None = None
    writer: ShardWriter | None = None
    complete: bool = False  # every source propagated for the full horizon
    replayed_steps: int = 0  # steps run on replayed batches after the fit
    steps_since_injection: int = 0  # propagation steps since the last batch that injected an example
    averaging: CurvatureAverage | None = None  # the pools' curvature averaged in its top subspace (set at the first step)
    progress: Any = None
    done: bool = False  # written to the store (this process's part)

    def active(self, epoch: int) -> bool:
        return not (self.done or self.complete) and epoch >= self.injection_epoch

    @property
    def averaging_products(self) -> int:
        """Curvature-vector products the curvature averaging has spent so far (0 without it)."""
        return self.averaging.products if self.averaging is not None else 0


class SimulationEngine:
    """Simulates the responses of the sources a process owns and writes them to a :class:`ResponseStore`.

    Args:
        settings: what to simulate. source_map: examples -> sources. space: the parameter space (``P``).
        store_path: the store directory (created beforehand by one process).
        partition: the sources this process simulates.
        curvature: the curvature operator factory (default: ``settings.curvature`` of :mod:`curvature`).
        progress: ``(name, total products) -> object with advance(int) and close()``, or None.
        reduce_sum: sums a tensor over the processes (the strategy's all-reduce). Given with several processes,
            they share the full-data curvature products of ``propagation="spectral"``: each computes them over its
            own block of the training set (all processes must then simulate the same checkpoints, in order).
        warn: how warnings are given (``warnings.warn``; the callback passes rank zero's).
    """

    def __init__(
        self,
        settings: AttributionSettings,
        source_map: SourceMap,
        space: ParameterSpace,
        store_path: str,
        partition: SourcePartition = SourcePartition(),
        *,
        curvature: CurvatureFactory | None = None,
        progress: Callable[[str, int], Any] | None = None,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
        warn: Callable[[str], None] = warnings.warn,
    ) -> None:
        self.settings, self.source_map, self.space, self.store_path = settings, source_map, space, store_path
        retain_freed_memory()  # the curvature products' temporaries reuse the heap instead of fresh mappings (allocator.py)
        self.dim = space.size
        self.partition = partition
        self.curvature = curvature or partial(curvature_operator, settings.curvature, chunk_size=settings.chunk_size)
        self._progress, self._warn = progress, warn
        self.phases = PhaseClock()  # this process's seconds per phase (the store's cost record)
        self._reduce_sum = None if reduce_sum is None else self._collective(reduce_sum)
        self.windows: list[Window] = []
        self.products = 0
        self.seconds = 0.0  # wall time spent simulating (this process)
        self.cpu_seconds = 0.0  # CPU time of this process meanwhile (time.process_time)
        self._clock: tuple[float, float] | None = None  # (wall, cpu) start of the simulation running now
        self.diverged_at: int | None = None
        self._pool: list[Any] = []
        self._warned_non_finite = False
        self._restored: dict[str, Any] = {}
        self._codec_entries: dict[str, dict] = {}  # checkpoint -> manifest fields of its shard writer (until its part is written)
        self._alone = False  # simulating a checkpoint by itself (simulate_checkpoint(alone=True))
        # while simulating a checkpoint whose fit left examples out of every batch: LongTensor[S], the examples of each
        # source none of whose examples was trained on (0 for the others; simulate_checkpoint(trained=...))
        self._never_trained: Tensor | None = None
        self._untrained: dict[str, int] | None = None  # ... and its counts, for the manifest entry
        self._warned_untrained = False

    # ------------------------------------------------------------------ shared
    @property
    def owned(self) -> Tensor:
        """``LongTensor[S_owned]``: the sources this process simulates now (every source while it simulates a checkpoint
        alone)."""
        return torch.arange(self.source_map.num_sources) if self._alone else self.partition.owned(self.source_map.num_sources)

    def propagation(self) -> str:
        """The rule ``propagation="auto"`` resolves to: in end mode, ``"spectral"`` with the GGN (the damped inverse
        in the top eigenspace of the full-data curvature, :mod:`deflated`) and Chebyshev with the Hessian (not PSD)
        where every curvature batch is the whole training set (no sampling noise to amplify); heavy-ball otherwise
        (minibatch curvature, or weights that move online; docs/propagation.md)."""
        s = self.settings
        if s.propagation != "auto":
            return s.propagation
        if s.mode == "end" and s.curvature == "ggn":
            return "spectral"
        exact = s.mode == "end" and s.curvature_batch_size >= self.source_map.num_examples
        return "chebyshev" if exact else "heavy_ball"

    def _step_rule(self, operator: CurvatureOperator, theta: Tensor) -> StepRule:
        s = self.settings
        return estimate_step_rule(
            operator, theta.numel(), s.damping, s.step_size, s.damping_scale, torch.Generator().manual_seed(s.seed),
            theta.device, self.propagation(), s.momentum,
        )  # fmt: skip

    def finite(self, model: FunctionalModel, theta: Tensor, batches: list[Any]) -> list[Any]:
        """Curvature batches without non-finite examples (warns once with the count)."""
        kept, dropped = [], 0
        for batch in batches:
            batch, n = finite_examples(model, theta, batch)
            dropped += n
            if batch_size_of(batch) > 0:
                kept.append(batch)
        if dropped and not self._warned_non_finite:
            self._warned_non_finite = True
            self._warn(f"{dropped} examples with a non-finite loss were left out of the curvature batches (warned once).")
        return kept

    def _full_curvature(self, model: FunctionalModel, theta: Tensor, batches: Iterable[tuple[Any, Tensor]]) -> list[Any]:
        """The training set's ``(data, index)`` batches as curvature batches (data only, finite examples only);
        raises when no example is finite."""
        curvature = self.finite(model, theta, [d for d, _ in batches])
        if not curvature:
            raise RuntimeError(_NO_FINITE_EXAMPLE)
        return curvature

    @property
    def _shares_curvature(self) -> bool:
        """Whether the processes share the full-data curvature's work (several of them, and an all-reduce)."""
        return self.partition.world_size > 1 and self._reduce_sum is not None and not self._alone

    def _full_data_operator(self, model: FunctionalModel, theta: Tensor, data: TrainingData) -> tuple[CurvatureOperator, bool, int]:
        """The curvature over the whole training set at ``theta``, whether this process tallies its products, and the
        examples it is over (the finite ones).

        On several processes (with ``reduce_sum``) each takes its block of the examples and the products are
        summed across them: the work is split and rank zero counts each product once."""
        s = self.settings
        if not self._shares_curvature:
            with self.phases("data"):
                batches = self._full_curvature(model, theta, data.in_order(s.curvature_batch_size))
            return self.curvature(model, theta, batches), True, sum(batch_size_of(b) for b in batches)
        with self.phases("data"):  # this process's block of the example indices
            mine = self.finite(model, theta, [d for d, _ in data.in_order(s.curvature_batch_size, self.partition.mask(self.source_map.num_examples))])
        count = sum(batch_size_of(b) for b in mine)
        total = int(self._reduce_sum(torch.tensor([float(count)], device=theta.device)).item())
        if total == 0:
            raise RuntimeError(_NO_FINITE_EXAMPLE)
        local = self.curvature(model, theta, mine) if mine else None
        return shared_operator(local, count, total, self._reduce_sum), self.partition.rank == 0, total

    def _column_split(self) -> ColumnSplit | None:
        """Where the processes share the full-data curvature, they also split the eigenspace finder's ``O(m^2 P)``
        algebra and memory: each keeps its columns of the Krylov space (:class:`ColumnSplit`)."""
        if not self._shares_curvature:
            return None
        return ColumnSplit(self.dim, self.partition.rank, self.partition.world_size, self._reduce_sum)

    def replay(self, model: FunctionalModel, theta: Tensor, data: TrainingData, count: int, step: int) -> list[Any]:
        """``count`` shuffled training batches of ``curvature_batch_size`` (generator ``seed + 1``, finite examples
        only); ``step``: the global step, for the error when nothing is finite."""
        batches = self.finite(model, theta, data.shuffled(self.settings.curvature_batch_size, count, self.settings.seed + 1))
        if not batches:
            raise RuntimeError(
                f"{DIVERGED.format(step=step)} Every replayed training example has a non-finite loss at the final "
                "weights, so no responses can be simulated."
            )
        return batches

    def _new_progress(self, name: str, done: int = 0, total: int | None = None) -> Any:
        """A progress bar of ``total`` curvature products (default: ``horizon`` per owned source)."""
        if self._progress is None:
            return None
        progress = self._progress(name, int(self.owned.numel()) * self.settings.horizon if total is None else total)
        progress.advance(done)
        return progress

    def _count(self, progress: Any, products: int) -> None:
        self.products += products
        if progress is not None:
            progress.advance(products)

    def _writer(self, name: str, model: FunctionalModel) -> ShardWriter:
        """The shard writer of checkpoint ``name`` in the codec of the settings (``"lorif"``: factors per layer)."""
        prefix = f"r{self.partition.rank}-" if self.partition.world_size > 1 else ""
        s, rows, encode = self.settings, self.settings.block_size(self.dim), None
        self._codec_entries[name] = {"codec": "dense"}
        if s.codec == "lorif":
            layers = factored_layers(model.module, self.space)
            encode = partial(encode_lowrank, space=self.space, layers=layers, rank=s.fixed_rank())
            self._codec_entries[name] = lowrank_entry(layers, s.fixed_rank())
        self._codec_entries[name].update(half_precision.entry(s.codec, s.store_dtype))  # scaled float16 (half dtypes)
        return ShardWriter(
            self.store_path, name, self.space, s.store_dtype, prefix=prefix, rows_per_shard=rows, encode=encode,
            stem="factors" if encode else "responses", scaled=half_precision.scaled(s.codec, s.store_dtype),
        )  # fmt: skip

    def _sum_together(self, tensors: list[Tensor]) -> list[Tensor]:
        """The sums over the processes of ``tensors`` (of one dtype and device), by one all-reduce of them laid end to
        end (one wait for the other processes instead of one per tensor)."""
        summed = self._reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        return [part.view(t.shape) for part, t in zip(summed.split([t.numel() for t in tensors]), tensors)]

    def _collective(self, reduce_sum: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``reduce_sum`` with its time (the transfer and the wait for the other processes) charged to the
        ``"collectives"`` phase."""

        def summed(tensor: Tensor) -> Tensor:
            with self.phases("collectives"):
                return reduce_sum(tensor)

        return summed

    @contextmanager
    def timed(self, phase: str = "other") -> Iterator[None]:
        """Adds the wall and CPU time of the block to ``seconds`` / ``cpu_seconds`` (simulation work, also when the
        caller does it: the callback's gathering of the live batches), and to ``phase`` where no phase inside it is
        named."""
        self._clock = (time.perf_counter(), time.process_time())
        try:
            with self.phases(phase):
                yield
        finally:
            self.seconds, self.cpu_seconds = self._costs()
            self._clock = None

    def _costs(self) -> tuple[float, float]:
        """``(wall, cpu)`` seconds simulated so far, the simulation running now included."""
        if self._clock is None:
            return self.seconds, self.cpu_seconds
        return self.seconds + time.perf_counter() - self._clock[0], self.cpu_seconds + time.process_time() - self._clock[1]

    def _cost_info(self, replayed: int = 0) -> dict[str, float]:
        seconds, cpu = self._costs()
        return {
            "curvature_products": self.products, "simulation_seconds": round(seconds, 3),
            "simulation_cpu_seconds": round(cpu, 3), "replayed_steps": replayed, "phases": self.phases.to_json(),
        }  # fmt: skip

    def _write_part(
        self, name: str, shards: list[dict], stats: dict[str, Tensor] | None, info: dict[str, Any] | None = None,
        replayed: int = 0, codec_entry: dict[str, Any] | None = None, sources: Tensor | None = None,
    ) -> None:  # fmt: skip
        """This process's share of checkpoint ``name``: its shards, the bookkeeping ``stats`` (``Tensor[S]`` each) of the
        sources it simulated (``sources``, default :attr:`owned`; ``stats`` None: none of them), its costs so far and
        ``info`` (the checkpoint's ``step_rule`` / ``spectral`` record) for :meth:`commit`."""
        owned = (self.owned if sources is None else sources) if stats is not None else torch.zeros(0, dtype=torch.long)
        if self._untrained is not None and stats is not None:  # the manifest entry says what the fit left out
            info = {**(info or {}), "untrained": self._untrained}
        stats = stats or {k: torch.zeros(self.source_map.num_sources, dtype=torch.long) for k in ("valid", "shortfall", "missing_examples")}
        codec_entry = self._codec_entries.pop(name, codec_entry)
        write_part(
            self.store_path, name, self.partition.rank, shards, owned, {k: v[owned] for k, v in stats.items()},
            self._cost_info(replayed), info=info, codec_entry=codec_entry,
        )  # fmt: skip
        _warn_invalid(self._warn, stats["valid"][owned])

    def skip_checkpoint(self, name: str) -> None:
        """On several processes: checkpoint ``name`` is simulated by another process alone (:meth:`simulate_checkpoint`);
        this process's part records its costs only."""
        self._write_part(name, [], None)

    def _write_block(self, name: str, block: Any, record: dict[str, Any], stats: dict[str, Tensor]) -> None:
        """Codecs ``"eigen"`` / ``"factored"``: the whole block of every source (this process computed or summed it) as
        the checkpoint's files, and this process's part that lists them; the other processes' parts list no source."""
        if self._shares_curvature and self.partition.rank != 0:  # every process holds the summed block: rank zero writes it
            return self.skip_checkpoint(name)
        with self.phases("write"):
            codec_entry, shards = ResponseStore.load(self.store_path).write_block(name, block, self.settings.store_dtype)
            self._write_part(name, shards, stats, record, codec_entry=codec_entry, sources=torch.arange(self.source_map.num_sources))

    # ------------------------------------------------------------------ end mode
    def simulate_checkpoint(
        self, model: FunctionalModel, theta: Tensor, data: TrainingData, name: str, step: int, alone: bool = False,
        trained: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Simulates the owned sources at ``theta`` (end mode or codecs ``"eigen"`` / ``"factored"``) and writes this
        process's part of checkpoint ``name`` (codecs ``"eigen"`` / ``"factored"``: the processes share the work when
        they share the curvature and rank zero writes the block; without an all-reduce, rank zero computes it alone).

        ``alone``: on several processes, this process simulates every source of the checkpoint by itself, with no
        collective (the same arithmetic as one process), while the others call :meth:`skip_checkpoint`: a trajectory
        ensemble's members go to different processes instead of each being shared (callback: ``checkpoint_owners``).

        ``trained``: ``BoolTensor[n]``, the examples the fit trained on (some training batch held them; None: all). Where
        it leaves out examples of the training set, the checkpoint is simulated as if the training set were the trained
        examples (:meth:`_trained_on`)."""
        self._alone = alone
        try:
            with self.timed(), self._trained_on(trained, data) as data:
                if self.settings.codec in ("eigen", "factored") and not (self._shares_curvature or alone or self.partition.rank == 0):
                    self.skip_checkpoint(name)
                elif self.settings.codec == "eigen":
                    self._simulate_eigen(model, theta, data, name)
                elif self.settings.codec == "factored":
                    self._simulate_factored(model, theta, data, name)
                else:
                    self._simulate_dense(model, theta, data, name, step)
        finally:
            self._alone = False

    @contextmanager
    def _trained_on(self, trained: Tensor | None, data: TrainingData) -> Iterator[TrainingData]:
        """Inside the block, the source map and ``data`` hold only the examples the fit trained on (``trained``:
        ``BoolTensor[n]``), when it left some out of every batch (a sampler over part of the dataset, ``drop_last``).

        The weights never moved for an untrained example, so its leave-one-out effect is zero and it is no part of the
        loss whose curvature and ``1/n`` the response takes: the curvature is over the trained examples, ``n`` their
        count, and a source's gradient the sum over its trained examples. So a source (a group) that lost some of its
        examples is scored as the removal of the ones trained on; one none of whose examples was trained on has no
        response: its row is NaN and its ``missing_examples`` (the mechanism of online mode's examples never injected)
        counts its examples, so it scores NaN. Nothing changes where every example was trained on, or none was (a fit
        that ran no batch, or resumed from a checkpoint without the record: the examples are taken as trained on)."""
        full = self.source_map
        left_out = None if trained is None else full.in_training_set & ~trained.cpu()
        if left_out is None or not bool(left_out.any()) or not bool(trained.any()):
            yield data
            return
        e2s = full.example_to_source
        self.source_map = SourceMap(e2s.where(~left_out, -1), full.source_ids)
        sizes, kept = full.sizes(), self.source_map.sizes()
        self._never_trained = sizes.where(kept == 0, 0)
        self._untrained = {
            "examples": int(left_out.sum()), "sources": int((kept == 0).sum()), "partly_trained_sources": int(((kept > 0) & (kept < sizes)).sum()),
            "trained_examples": self.source_map.training_set_size,
        }  # fmt: skip
        self._warn_untrained()
        try:
            yield data.restricted(trained.cpu())
        finally:
            self.source_map, self._never_trained, self._untrained = full, None, None

    def _warn_untrained(self) -> None:
        """Once per fit: how many sources were never trained on, why that happens, what they score and what to do."""
        if self._warned_untrained:
            return
        self._warned_untrained = True
        counts, partly = self._untrained, self._untrained["partly_trained_sources"]
        self._warn(
            f"{counts['sources']} of {self.source_map.num_sources} sources were never trained on: no training batch held any "
            f"of their examples ({counts['examples']} training examples were in none; the train loader's sampler "
            "covers part of the dataset, e.g. SubsetRandomSampler, or drop_last=True without shuffling drops the same examples "
            "every epoch). Removing them changes nothing the fit learned, so they score NaN (recorded per source in the "
            f"store as missing_examples), and the responses take the {counts['trained_examples']} examples trained on "
            "as the training set"
            + (f"; {partly} sources that lost some of their examples are scored as the removal of those trained on" if partly else "")
            + ". To attribute to them, train on them; to leave them out, make the training dataset the Subset trained on "
            "(Subset(IndexedDataset(data), indices)): its other examples are then no sources."
        )

    def _end_stats(self, valid: Tensor) -> dict[str, Tensor]:
        """End mode's per-source bookkeeping of a checkpoint (``Tensor[S]`` each): ``valid`` (finite gradients), no
        ``shortfall``, and as ``missing_examples`` the examples of the sources never trained on (:meth:`_trained_on`)."""
        zeros = torch.zeros(self.source_map.num_sources, dtype=torch.long)
        missing = zeros.clone() if self._never_trained is None else self._never_trained.clone()
        return {"valid": valid, "shortfall": zeros, "missing_examples": missing}

    def _unscorable(self, sources: Tensor, finite: Tensor) -> Tensor:
        """``BoolTensor`` like ``finite``: of ``sources`` (``LongTensor``), those whose rows are written NaN: non-finite
        gradients, or never trained on (no reader may take either for zero)."""
        if self._never_trained is None:
            return ~finite
        return ~finite | (self._never_trained[sources.cpu()] > 0).to(finite.device)

    def _simulate_dense(self, model: FunctionalModel, theta: Tensor, data: TrainingData, name: str, step: int) -> None:
        s, source_map = self.settings, self.source_map
        progress = None
        if self.propagation() == "spectral":
            inverse, record = self._deflated_inverse(model, theta, data, name)
            solve = inverse.apply
        else:
            replay = self.replay(model, theta, data, s.horizon, step)
            operators = [self.curvature(model, theta, [b]) for b in replay]
            rule = self._step_rule(operators[0], theta)
            progress = self._new_progress(name)
            counted = [_Counting(op, self, progress) for op in operators]
            solve, record = partial(propagate, operators=counted, rule=rule), rule.to_json()
        writer, valid = self._writer(name, model), torch.ones(source_map.num_sources, dtype=torch.bool)
        e2s = source_map.example_to_source
        for block in self.owned.split(s.block_size(self.dim)):
            local = torch.full((source_map.num_sources,), -1, dtype=torch.long)
            local[block] = torch.arange(block.numel())
            examples = (e2s >= 0) & (local[e2s.clamp_min(0)] >= 0)
            batches = data.in_order(s.curvature_batch_size, None if bool(examples.all()) else examples)
            with self.phases("gradients"):
                u0, finite = initial_perturbations(model, theta, batches, local[e2s.clamp_min(0)].where(e2s >= 0, -1), block.numel())
            with self.phases("inverse"):
                responses = solve(u0).div_(source_map.training_set_size)
            del u0
            responses[self._unscorable(block, finite)] = float("nan")  # no reader may take them for zero
            valid[block] = finite.cpu()
            with self.phases("write"):
                writer.add(block, responses)
            del responses
        if progress is not None:
            progress.close()
        with self.phases("write"):
            writer.flush()
            self._write_part(name, writer.shards, self._end_stats(valid), {"step_rule": record})

    def _simulate_factored(self, model: FunctionalModel, theta: Tensor, data: TrainingData, name: str) -> None:
        """Codec ``"factored"``: the dense default's responses (the same :meth:`_deflated_inverse`) kept as eigen
        coordinates and ``gamma g_s`` with each Linear / Conv weight's gradient as per-example factors (:mod:`factored`). Each
        block of owned sources: its dense gradients (for the dense rest and the checks) and one more pass for the factors,
        checked against them (:func:`check_factors`; each factored layer's bias against its ``U`` summed over columns,
        :func:`bias_agreement`: folded where every block agrees). Several processes sharing the curvature each fill their
        sources' rows and sum them; without an all-reduce rank zero simulates every source. The block is then built from the
        summed gradients by the store's own reader (:meth:`FactoredResponses.from_tensors`: the folded biases rebuilt from
        ``U``; the eigen coordinates, not stored, are not derived). Rank zero keeps the block for :meth:`commit`."""
        s, source_map, n = self.settings, self.source_map, self.source_map.training_set_size
        inverse, record = self._deflated_inverse(model, theta, data, name)
        sources = self.owned if self._shares_curvature else torch.arange(source_map.num_sources)
        e2s = source_map.example_to_source
        probe = next(data.in_order(s.curvature_batch_size, (e2s >= 0) if not bool((e2s >= 0).all()) else None))[0]
        plan = FactorPlan.of(model, theta, probe, e2s)  # one batch shows each layer's rows per example
        basis, sigma = inverse.eigenspace.vectors, inverse.eigenspace.eigenvalues.to(theta.device)
        gamma = 1.0 / (inverse.complement + inverse.damping)
        count = source_map.num_sources
        biases = plan.biases(self.space)  # folded into their weight's factors where every block agrees
        agree = torch.ones(len(biases), dtype=torch.bool)
        shapes = dict(zip(self.space.names, self.space.shapes))
        rest = {name_: theta.new_zeros(count, *shape) for name_, shape in shapes.items() if name_ not in plan.ranks}
        factors = plan.zeros(self.space, count, theta)
        valid = torch.ones(count, dtype=torch.bool)
        for block in sources.split(s.block_size(self.dim)):
            local = torch.full((count,), -1, dtype=torch.long)
            local[block] = torch.arange(block.numel())
            rows = local[e2s.clamp_min(0)].where(e2s >= 0, -1)
            examples = rows >= 0
            batches = list(data.in_order(s.curvature_batch_size, None if bool(examples.all()) else examples))
            with self.phases("gradients"):
                u0, finite = initial_perturbations(model, theta, batches, rows, block.numel())
                finite_batches = [(select_examples(d, keep), i[keep.to(i.device)]) for d, i in batches for keep in [_finite_rows(model, theta, d)]]
                found = plan.factors(model, theta, finite_batches, rows, block.numel())
            parts = self.space.unflatten(u0)
            check_factors(found, parts, finite)
            agree &= bias_agreement(found, parts, finite, biases)
            for name_, tensor in rest.items():
                tensor[block] = parts[name_] * (gamma / n)
            for name_, (u, v) in found.items():
                factors[name_][0][block], factors[name_][1][block] = u * (gamma / n), v
            valid[block] = finite.cpu()
            del u0, parts
        if self._shares_curvature:  # each process filled its sources' rows: one all-reduce sums them all
            invalid, disagree = (~valid).to(theta.device, theta.dtype), (~agree).to(theta.device, theta.dtype)
            *summed, invalid, disagree = self._sum_together([*rest.values(), *itertools.chain(*factors.values()), invalid, disagree])
            rest = dict(zip(rest, summed[: len(rest)]))
            factors = {k: (summed[len(rest) + 2 * i], summed[len(rest) + 2 * i + 1]) for i, k in enumerate(factors)}
            valid, agree = invalid == 0, (disagree == 0).cpu()
        valid = valid.cpu()
        bad = self._unscorable(torch.arange(count), valid).to(theta.device)
        for u, _ in factors.values():
            u[bad] = float("nan")  # non-finite gradients or never trained on: no reader may take them for zero
        for tensor in rest.values():
            tensor[bad] = float("nan")
        folded = {b: w for (b, w), ok in zip(biases.items(), agree.tolist()) if ok}
        stored = {k: t for k, t in LowRankResponses(self.space, factors, rest).tensors().items() if k not in folded}
        # the block as the store reads it back: the folded biases rebuilt; its eigen coordinates, which the store does not
        # keep, are derived only if read (the writer does not read them: 0.45 s CPU per member on the MNIST-1D MLP)
        block_ = FactoredResponses.from_tensors(self.space, basis, sigma, inverse.damping, gamma, stored, folded)
        _warn_invalid(self._warn, valid)
        self._write_block(name, block_, {"step_rule": record}, self._end_stats(valid))  # the dense default's record and key

    def _deflated_inverse(self, model: FunctionalModel, theta: Tensor, data: TrainingData, name: str) -> tuple[DeflatedInverse, dict]:
        """``propagation="spectral"``: the top eigenspace of the GGN over the whole training set at ``theta`` (``rank`` pairs,
        or with ``rank="auto"`` grown until ``sigma_k <= AUTO_RANK_RATIO lam`` within :func:`product_cap`) and the damping
        (its Ritz values and ``trace(G)``: read from the space's first block with ``rank="auto"``, 32 Hutchinson probes with
        a fixed rank), as a :class:`DeflatedInverse` and its ``step_rule`` record."""
        s = self.settings
        curvature, tally, _ = self._full_data_operator(model, theta, data)
        auto = s.rank == "auto"
        cap = product_cap(self.dim, s.memory_budget_mb) if auto else eigenspace_products(self.dim, min(s.rank, self.dim))
        progress = self._new_progress(name, total=cap if auto else TRACE_PROBES + cap)  # rank="auto": the cap; close() sets what was done
        operator = _Counting(curvature, self, progress, tally)
        split = self._column_split()
        generator = torch.Generator().manual_seed(s.seed)
        if auto:
            # the threshold AUTO_RANK_RATIO x lam: lam by the damping rule, from the Ritz values and the mean eigenvalue
            # the finder reads from its first block as the space grows (adaptive_eigenspace's callable threshold)
            threshold = (
                partial(_auto_rank_threshold, damping_scale=s.damping_scale) if s.damping == "auto"
                else AUTO_RANK_RATIO * resolve_damping(s.damping, s.damping_scale, float("nan"))  # a given float
            )  # fmt: skip
            # cold at every checkpoint, also stopped once the Ritz pairs down to the threshold have converged (residual
            # rule): 25-30% fewer products than 2 per pair on the digits MLP and CNNs, 11% on the MNIST-1D MLP, Pearson to
            # the exact target >= 0.99. Warm-started from the previous checkpoint's eigenvectors (adaptive_eigenspace's
            # initial=), the trajectory ensemble's later members cost MORE (digits MLP, epochs 3 -> 6 -> 30: 651 and 715
            # products against 448 and 416 cold): the old basis costs a product per row and its lower pairs still have to
            # converge (benchmarks/eigenspace.py members). trace(G) comes from the space's first block (its 32 Gaussian
            # rows): no Hutchinson probes of their own (32 products per checkpoint fewer; benchmarks/auto_rank.py).
            with self.phases("eigenspace algebra"):
                space = adaptive_eigenspace(
                    operator, self.dim, threshold, max_products=cap, tolerance=DEFAULT_RESIDUAL_TOLERANCE,
                    generator=generator, device=theta.device, split=split,
                )  # fmt: skip
            mean_eigenvalue = space.trace / self.dim
        else:
            spectrum = estimate_spectrum(operator, self.dim, probes=TRACE_PROBES, power_iterations=0, generator=generator, device=theta.device)
            mean_eigenvalue = spectrum.mean_eigenvalue
            # a fixed rank spends its budget whatever the start: cold (warm-started at the same budget, a small CNN
            # reached Pearson 0.94 to the exact target against 0.97 cold)
            with self.phases("eigenspace algebra"):
                space = top_eigenspace(operator, self.dim, min(s.rank, self.dim), generator=generator, device=theta.device, split=split)
        if progress is not None:
            progress.close()
        damping, rule = eigenspace_damping(s.damping, s.damping_scale, space.eigenvalues, mean_eigenvalue)
        inverse = DeflatedInverse.from_trace(space, damping, mean_eigenvalue * self.dim, self.dim)
        ratio, k = inverse.complement_ratio, space.rank
        if space.stop == "cap":
            self._warn(
                f"propagation='spectral', rank='auto': the eigenspace stopped at its cap of {cap} curvature products "
                f"(memory_budget_mb={s.memory_budget_mb:g}: the finder holds 20 x products x P bytes) with its {k}-th "
                f"eigenvalue {ratio:.2g}x the damping ({damping:.3g}), above the {AUTO_RANK_RATIO:g} it aims at, so curvature "
                "outside it is not resolved and the responses fall short of the damped inverse there. Raise memory_budget_mb "
                "or damping_scale."
            )
        elif ratio > COMPLEMENT_WARNING_RATIO and not auto:
            self._warn(
                f"propagation='spectral': the {k}-th eigenvalue of the curvature is {ratio:.2g}x "
                f"the damping ({damping:.3g}), so curvature outside the top-{k} eigenspace is not resolved and the "
                f"responses fall short of the damped inverse there. Raise rank (cost: about {space.products / k:.0f} "
                "curvature products over the training set per eigenpair; rank='auto' grows it to the damping) or damping_scale."
            )
        record = {**inverse.to_json(), **rule, "mean_eigenvalue": mean_eigenvalue, "rank_setting": s.rank}
        if auto:
            record.update(rank_target_ratio=AUTO_RANK_RATIO, product_cap=cap, residual_tolerance=DEFAULT_RESIDUAL_TOLERANCE, trace_probes=space.probes)
        return inverse, record

    def _simulate_eigen(self, model: FunctionalModel, theta: Tensor, data: TrainingData, name: str) -> None:
        """Codec ``"eigen"``: the top-``rank`` eigenspace of the GGN over the whole training set, then each source's
        damped coordinates in it (one pass of per-source gradients). Several processes (with ``reduce_sum``) share the
        eigenspace as ``propagation="spectral"`` does (each its block of the examples and its columns of the Krylov
        space), project the gradients of their own sources, and sum the coordinates: rank zero keeps them for
        :meth:`commit`."""
        s, source_map = self.settings, self.source_map
        curvature, tally, examples = self._full_data_operator(model, theta, data)
        e2s, split = source_map.example_to_source, self._column_split()
        owned = None  # one process: every source's gradients
        if split is not None:
            owned = (e2s >= 0) & self.partition.mask(source_map.num_sources)[e2s.clamp_min(0)]
        batches = data.in_order(s.curvature_batch_size, owned)
        spectral = s.propagation in ("auto", "spectral")
        with self.phases("eigenspace algebra"):
            block, finite, info = eigen_responses(
                model, theta, batches, [], source_map.example_to_source, source_map.num_sources,
                source_map.training_set_size, rank=s.fixed_rank(), sketch=s.sketch, damping=s.damping, damping_scale=s.damping_scale,
                # "auto" / "spectral": the damped inverse per eigen-direction (the dense default's response restricted to the
                # space); a step rule: what its `horizon` steps make of each direction
                horizon=None if spectral else s.horizon, propagation="spectral" if spectral else s.propagation,
                chunk_size=s.chunk_size, momentum=s.momentum,
                generator=torch.Generator().manual_seed(s.seed), operator=_Counting(curvature, self, None, tally=False), split=split,
            )  # fmt: skip
        info["curvature_examples"] = examples
        if split is not None:  # each process holds its sources' coordinates (zero rows elsewhere)
            coordinates, invalid = self._sum_together([block.coordinates, (~finite).to(block.coordinates)])
            block, finite = replace(block, coordinates=coordinates), invalid == 0
        if not tally:  # rank zero writes the summed block
            return self.skip_checkpoint(name)
        self.products += info["curvature_products"]
        stats = self._end_stats(finite.cpu())
        _warn_invalid(self._warn, stats["valid"])
        block.coordinates[self._unscorable(torch.arange(source_map.num_sources), finite)] = float("nan")
        self._write_block(name, block, {"spectral": info}, stats)

    def commit(self, store: ResponseStore, name: str, theta: Tensor, info: dict[str, Any], parts: int) -> None:
        """Lists checkpoint ``name`` in the manifest once every process wrote its part (call it on one process
        after the others are done). ``info``: the caller's context (epoch, step, mode, ...)."""
        store.commit(name, theta, info=info, parts=parts, dtype=self.settings.store_dtype)

    # ------------------------------------------------------------------ online windows
    def plan(self, windows: Sequence[tuple[str, int]], restored: dict[str, Any] | None = None) -> None:
        """The online windows ``(name, injection epoch (0-based))``, the final one last; ``restored``: the
        :meth:`state_dict` of a resumed fit."""
        restored = (restored or {}).get("windows", {})
        self.windows = [Window(name, epoch) for name, epoch in windows]
        for window in self.windows:
            window.done = restored.get(window.name) == "done"
        self._restored = restored

    def active(self, epoch: int) -> bool:
        return any(w.active(epoch) for w in self.windows)

    def on_optimizer_step(
        self, model: FunctionalModel, theta: Tensor, batches: list[tuple[Any, Tensor]], epoch: int, step: int, pool_size: int
    ) -> list[Window]:
        """One optimizer step's live batches ``(data, example index)`` (every process's, in a distributed fit):
        injects (during a window's injection epoch), pools them into curvature batches of at least
        ``pool_size`` examples and propagates each active window one step per full pool. Returns the
        checkpoint windows (not ``"final"``) that completed: write them with :meth:`close_window`."""
        with self.timed():
            return self._live_step(model, theta, batches, epoch, step, pool_size)

    def _live_step(
        self, model: FunctionalModel, theta: Tensor, batches: list[tuple[Any, Tensor]], epoch: int, step: int,
        pool_size: int,
    ) -> list[Window]:
        finished: list[Window] = []
        curvature_batches = self.finite(model, theta, [d for d, _ in batches])
        if not curvature_batches:  # every example non-finite: nothing to learn the curvature from
            self.diverged_at = step if self.diverged_at is None else self.diverged_at
            return finished
        active = [w for w in self.windows if w.active(epoch)]
        for window in active:
            if window.simulation is None:
                self._open(window, model, theta)
            if epoch == window.injection_epoch:
                with self.phases("gradients"):
                    injected = [window.simulation.inject(model, theta, data, index) for data, index in batches]
                if any(injected):
                    window.steps_since_injection = 0
        # live batches are pooled into curvature batches of >= pool_size examples: one propagation step per
        # pool, at the weights of the step that completes it (less sampling noise)
        self._pool.extend(curvature_batches)
        if sum(batch_size_of(b) for b in self._pool) >= pool_size:
            operator = self.curvature(model, theta, self._pool)
            pool, self._pool = self._pool, []
            for window in active:
                self._step(window, operator, theta, partial(self._pool_share, model, theta, pool))
                # every source of the window has spent its horizon (the same step on every process)
                if epoch > window.injection_epoch and window.steps_since_injection > self.settings.horizon:
                    window.complete = True
                    if window.name != "final":  # the final window is written at the end of fit, final weights
                        finished.append(window)
        return finished

    def _open(self, window: Window, model: FunctionalModel, theta: Tensor) -> None:
        """A window's simulation and shard writer (restored on resume); its step rule is set at its first step."""
        source_map = self.source_map
        window.writer = self._writer(window.name, model)
        window.simulation = OnlineSimulation(
            source_map.example_to_source, source_map.num_sources, theta.numel(), self.settings.horizon, None,
            theta.device, sink=window.writer.add, num_examples=source_map.training_set_size,
            owned=self.partition.mask(source_map.num_sources),
        )  # fmt: skip
        state = self._restored.get(window.name)
        if isinstance(state, dict):
            window.simulation.load_state_dict(state["simulation"])
            window.writer.load_state_dict(state["writer"])
            window.steps_since_injection = int(state["steps_since_injection"])
            if state.get("averaging") is not None:
                window.averaging = CurvatureAverage.from_state(state["averaging"], theta.device)
        window.progress = self._new_progress(window.name, window.simulation.products)

    def _step(
        self, window: Window, operator: CurvatureOperator, theta: Tensor, shared: Callable[[], CurvatureOperator] | None = None
    ) -> None:
        """One propagation step of ``window`` with the pool's ``operator``; ``shared``: the same curvature as a collective
        (:meth:`_pool_share`), for the window's first pool on several processes."""
        simulation = window.simulation
        before, averaging_before = simulation.products, window.averaging_products
        if simulation.rule is None:  # from the window's first pool: a mid-training window's curvature is its own
            with self.phases("step rule"):
                # several processes hold the same (gathered) pool: they share the products and the Krylov algebra of
                # the step rule's spectrum and of the averaged subspace instead of each repeating them
                split = self._column_split() if shared is not None else None
                first = shared() if split is not None else operator
                simulation.rule = self._step_rule(first, theta)
                window.averaging = self._curvature_average(first, theta, split)
        if window.averaging is not None:
            operator = window.averaging.wrap(operator)
        with self.phases("curvature products"):  # and the propagation's vector updates
            simulation.step(operator)
        window.steps_since_injection += 1
        spent = simulation.products - before
        if self.partition.rank == 0:  # every process repeats the averaging on the same (gathered) pools: counted once
            spent += window.averaging_products - averaging_before
        self._count(window.progress, spent)

    def _curvature_average(self, operator: CurvatureOperator, theta: Tensor, split: ColumnSplit | None = None) -> CurvatureAverage | None:
        """``averaged_rank > 0`` with the GGN: the top subspace of this (first) pool's curvature, in which every
        pool's curvature is replaced by the running mean (:mod:`curvature_average`); None otherwise (the Hessian's
        top eigenspace by value would miss its negative directions). ``split``: ``operator`` is a collective and the
        finder's columns are split among the processes."""
        s = self.settings
        if s.averaged_rank == 0 or s.curvature != "ggn":
            return None
        return CurvatureAverage.of(operator, theta.numel(), s.averaged_rank, torch.Generator().manual_seed(s.seed + 2), theta.device, split)

    def _pool_share(self, model: FunctionalModel, theta: Tensor, pool: list[Any]) -> CurvatureOperator:
        """The curvature of a pool every process holds, as a collective: each process takes its contiguous block of
        every batch's examples, and the products are summed (:func:`shared_operator`)."""
        rank, world_size = self.partition.rank, self.partition.world_size
        sizes = [batch_size_of(b) for b in pool]
        mine = [select_examples(b, torch.arange(n * rank // world_size, n * (rank + 1) // world_size)) for b, n in zip(pool, sizes)]
        mine = [b for b in mine if batch_size_of(b) > 0]
        local = self.curvature(model, theta, mine) if mine else None
        return shared_operator(local, sum(batch_size_of(b) for b in mine), sum(sizes), self._reduce_sum)

    def finish_on_replay(self, model: FunctionalModel, theta: Tensor, data: TrainingData, window: Window, step: int) -> None:
        """Propagates what is still live when the fit ends for its remaining steps, at the final weights, on
        batches replayed from the training set (at most ``horizon`` of them)."""
        simulation = window.simulation
        steps = int(simulation.remaining.max()) if simulation.num_live else 0  # finish() adds the last increments
        if steps == 0:
            return
        with self.timed():
            for batch in self.replay(model, theta, data, steps, step):
                self._step(window, self.curvature(model, theta, [batch]), theta)
        window.replayed_steps = steps

    def close_window(self, window: Window) -> None:
        """Finishes a window (every owned source not yet retired goes to its shards, incomplete ones as NaN) and
        writes this process's part; then :meth:`commit` it."""
        simulation, source_map = window.simulation, self.source_map
        owned = self.partition.mask(source_map.num_sources)
        missing = ~simulation.injected.cpu() & source_map.in_training_set
        simulation.finish()
        shortfall = simulation.shortfall.cpu()
        missing_per_source = torch.bincount(source_map.example_to_source[missing], minlength=source_map.num_sources)
        n_missing, n_short = int(missing_per_source[owned].sum()), int((shortfall[owned] > 0).sum())
        if n_missing or n_short:
            self._warn(
                f"Window {window.name!r}: {n_missing} training examples were never injected and {n_short} sources "
                f"were propagated for fewer than {self.settings.horizon} steps; both are recorded per source in the "
                "store, and those sources score NaN."
            )
        stats = {"valid": simulation.valid.cpu(), "shortfall": shortfall, "missing_examples": missing_per_source}
        rule = simulation.rule
        record = None if rule is None else {**rule.to_json(), **(window.averaging.to_json() if window.averaging else {})}
        window.writer.flush()
        self._write_part(window.name, window.writer.shards, stats, {"step_rule" if rule else "spectral": record}, window.replayed_steps)
        if window.progress is not None:
            window.progress.close()
        window.done, window.simulation, window.writer, window.progress = True, None, None, None

    def live(self) -> list[OnlineSimulation]:
        return [w.simulation for w in self.windows if w.simulation is not None and not w.done]

    def state_dict(self) -> dict[str, Any]:
        windows = {}
        for w in self.windows:
            if w.done:
                windows[w.name] = "done"
            elif w.simulation is not None:
                w.writer.flush()  # rows waiting are written, so the state names every shard it relies on
                windows[w.name] = {
                    "simulation": w.simulation.state_dict(), "writer": w.writer.state_dict(),
                    "steps_since_injection": w.steps_since_injection,
                    "averaging": None if w.averaging is None else w.averaging.state_dict(),
                }  # fmt: skip
        return {"windows": windows}


class _Counting:
    """A curvature operator that counts its products into the engine (and its progress bar)."""

    def __init__(self, operator: CurvatureOperator, engine: SimulationEngine, progress: Any, tally: bool = True) -> None:
        self.operator, self.engine, self.progress, self.tally = operator, engine, progress, tally

    def __call__(self, block: Tensor) -> Tensor:
        if self.tally:
            self.engine._count(self.progress, block.shape[0])
        elif self.progress is not None:
            self.progress.advance(block.shape[0])
        with self.engine.phases("curvature products"):
            return self.operator(block)


def _auto_rank_threshold(ritz_values: Tensor, mean_eigenvalue: float, damping_scale: float, ratio: float = AUTO_RANK_RATIO) -> float | None:
    """``rank="auto"``'s threshold ``ratio x lam`` (default ``AUTO_RANK_RATIO``), ``lam`` by the eigenspace rule on the Ritz
    values found so far (``Tensor[k]``, descending; None while ``k < RITZ_INDEX``) and ``trace(G) / P``."""
    lam = ritz_damping(ritz_values, damping_scale, mean_eigenvalue)
    return None if lam is None else ratio * lam


def _finite_rows(model: FunctionalModel, theta: Tensor, data: Any) -> Tensor:
    """``LongTensor[B']``: the examples of ``data`` whose loss is finite at ``theta``."""
    return finite_loss_mask(model, theta, data).nonzero().squeeze(1)


def _warn_invalid(warn: Callable[[str], None], valid: Tensor) -> None:
    if not bool(valid.all()):
        bad = (~valid).nonzero().squeeze(1)
        warn(
            f"{bad.numel()} sources had non-finite gradients or responses (first: {bad[:5].tolist()}); they are "
            "stored as invalid and score NaN. Check those examples and the loss for NaN/inf."
        )
