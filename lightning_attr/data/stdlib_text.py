"""Byte-level text from the running Python's standard-library sources, one source per module.

Offline on every machine: the text is read from ``sysconfig.get_paths()["stdlib"]``. Modules are the
top-level ``*.py`` files whose size is at least ``min_bytes``, sorted by name; the first ``n_modules``
are used. Each module gives the same budget of training windows, so the run size does not depend on
the Python version's file sizes (which modules are picked does).

Each module's text is split: the first ``train_fraction`` feeds ``windows_per_module`` training windows
(evenly spaced, non-overlapping where the text allows); the rest is held out and gives
``queries_per_module`` **continuations**: a window that ends at the end of a held-out line of code,
whose targets are that line only (the context before it is masked with ``IGNORE_INDEX``). A line qualifies
when it has at most ``context // 2`` bytes and at least ``min(12, context // 4)`` that are not spaces. The query's
loss is then the mean next-byte loss of the continuation given its context.

Tokens: ``0`` = any byte outside printable ASCII, ``1`` = newline, ``2 + (b - 32)`` = printable byte
``b`` (space to ``~``): ``VOCAB_SIZE = 97``.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_attr.data.datamodule import SplitDataModule
from lightning_attr.models.causal_lm import IGNORE_INDEX

VOCAB_SIZE = 97


def encode(text: bytes) -> Tensor:
    """``LongTensor[len(text)]`` tokens of raw bytes (carriage returns dropped)."""
    raw = torch.frombuffer(bytearray(text.replace(b"\r", b"")), dtype=torch.uint8).long()
    tokens = torch.zeros_like(raw)
    tokens[raw == 10] = 1
    printable = (raw >= 32) & (raw <= 126)
    tokens[printable] = raw[printable] - 30
    return tokens


def decode(tokens: Tensor) -> str:
    """Text of tokens (``0`` as ``?``; masked targets are skipped)."""
    out = []
    for t in tokens.tolist():
        if t == 1:
            out.append("\n")
        elif t >= 2:
            out.append(chr(t + 30))
        elif t == 0:
            out.append("?")
    return "".join(out)


def stdlib_modules(n_modules: int, min_bytes: int, stdlib_dir: str | Path | None = None) -> list[Path]:
    """The first ``n_modules`` top-level ``*.py`` files of the standard library of at least ``min_bytes``, by name."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file() and p.stat().st_size >= min_bytes), key=lambda p: p.stem)
    if len(files) < n_modules:
        raise ValueError(
            f"{root} holds {len(files)} top-level modules of at least {min_bytes} bytes, fewer than "
            f"n_modules={n_modules}; lower n_modules or min_bytes."
        )
    return files[:n_modules]


@dataclass(frozen=True)
class StdlibText:
    """Training windows and held-out continuations. Shapes: ``n`` windows, ``Q`` queries, ``T`` context.

    Attributes:
        modules: ``[M]`` module names (file stems), the sources' ids.
        x_train, y_train: ``LongTensor[n, T]`` input tokens and next tokens.
        module_of_window: ``LongTensor[n]`` position in ``modules`` of each window's module.
        x_query, y_query: ``LongTensor[Q, T]``; ``y_query`` is ``IGNORE_INDEX`` except on the continuation.
        module_of_query: ``LongTensor[Q]`` the module each continuation was held out from.
    """

    modules: list[str]
    x_train: Tensor
    y_train: Tensor
    module_of_window: Tensor
    x_query: Tensor
    y_query: Tensor
    module_of_query: Tensor

    def continuation(self, q: int) -> tuple[str, str]:
        """``(context, continuation)`` text of query ``q``."""
        target = self.y_query[q] != IGNORE_INDEX
        first = int(target.nonzero()[0])
        context = decode(self.x_query[q, : first + 1])
        return context, decode(self.y_query[q, target])


def _training_windows(tokens: Tensor, count: int, context: int) -> Tensor:
    """``[count, context + 1]`` evenly spaced windows of ``tokens`` (which must hold at least one)."""
    span = context + 1
    starts = torch.linspace(0, len(tokens) - span, count).round().long()
    return torch.stack([tokens[s : s + span] for s in starts.tolist()])


def _continuations(tokens: Tensor, count: int, context: int, min_line: int, max_line: int) -> list[tuple[Tensor, int]]:
    """Up to ``count`` ``(window [context + 1], line length)``: windows that end with a held-out line of at
    most ``max_line`` bytes (its newline included) and at least ``min_line`` non-space ones (so that a line is
    more than ``else:``), the lines evenly spaced over the candidates."""
    ends = (tokens == 1).nonzero().squeeze(1).tolist()
    candidates = []
    for prev, end in zip(ends, ends[1:]):
        length = end - prev  # the line's bytes and its newline
        visible = int((tokens[prev + 1 : end] != 2).sum())  # token 2 = space
        if min_line <= visible and length <= max_line and prev + 1 >= context:  # the line lies past the cut
            candidates.append((end, length))
    if not candidates:
        return []
    picks = torch.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().long().unique().tolist()
    return [(tokens[end - context : end + 1], length) for end, length in (candidates[i] for i in picks)]


def load_stdlib_text(
    n_modules: int = 120,
    windows_per_module: int = 16,
    context: int = 64,
    queries_per_module: int = 2,
    train_fraction: float = 0.8,
    min_bytes: int = 4000,
    stdlib_dir: str | Path | None = None,
) -> StdlibText:
    """Build :class:`StdlibText` (deterministic given the standard library's files).

    Args:
        n_modules: sources (modules); ``windows_per_module``: training windows of each.
        context: ``T``, tokens seen per prediction. queries_per_module: held-out continuations per module.
        train_fraction: share of each module's text (from its start) the training windows are drawn from.
        min_bytes: smallest module size considered.
        stdlib_dir: another directory of ``*.py`` files (default: this Python's standard library).
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    if min(n_modules, windows_per_module, context, queries_per_module) < 1:
        raise ValueError("n_modules, windows_per_module, context and queries_per_module must be >= 1.")
    modules, train, owners, queries, query_owners, lengths = [], [], [], [], [], []
    for path in stdlib_modules(n_modules, min_bytes, stdlib_dir):
        tokens = encode(path.read_bytes())
        cut = int(len(tokens) * train_fraction)
        if cut < context + 1 or len(tokens) - cut < context + 1:
            raise ValueError(
                f"{path.name} has {len(tokens)} bytes, too few for context={context} at train_fraction="
                f"{train_fraction}; raise min_bytes or lower context."
            )
        held_out = _continuations(tokens[cut - context :], queries_per_module, context, min(12, context // 4), context // 2)
        position = len(modules)
        modules.append(path.stem)
        train.append(_training_windows(tokens[:cut], windows_per_module, context))
        owners.append(torch.full((windows_per_module,), position))
        for window, length in held_out:
            queries.append(window)
            lengths.append(length)
            query_owners.append(position)
    if not queries:
        raise ValueError(
            f"no held-out line of at most {context // 2} bytes with code in it was found in any module; raise context."
        )
    windows, held = torch.cat(train), torch.stack(queries)
    y_query = held[:, 1:].clone()
    for q, length in enumerate(lengths):
        y_query[q, : context - length] = IGNORE_INDEX
    return StdlibText(
        modules=modules,
        x_train=windows[:, :-1].contiguous(),
        y_train=windows[:, 1:].contiguous(),
        module_of_window=torch.cat(owners),
        x_query=held[:, :-1].contiguous(),
        y_query=y_query,
        module_of_query=torch.tensor(query_owners),
    )


class StdlibTextDataModule(SplitDataModule):
    """:func:`load_stdlib_text` for the app (``data=stdlib_text``): training batches ``(x, y, index)``,
    query batches ``(x, y)`` (``y`` masked to the continuation).

    Sources come from ``metadata["module"]`` (``sources=by_column sources.column=module``), named by
    :attr:`column_names`. Queries: ``"test"`` (held-out continuations) or ``"train"`` (training windows).

    Args:
        n_modules, windows_per_module, context, queries_per_module, train_fraction, min_bytes: see
            :func:`load_stdlib_text`.
        vocab_size: must be :data:`VOCAB_SIZE` (checked; model configs read it).
        batch_size: training windows per batch. eval_batch_size: queries per batch. num_workers: DataLoader workers.
    """

    dataset = "stdlib_text"
    display_shape = None

    def __init__(
        self,
        n_modules: int = 120,
        windows_per_module: int = 24,
        context: int = 48,
        queries_per_module: int = 1,
        train_fraction: float = 0.8,
        min_bytes: int = 4000,
        vocab_size: int = VOCAB_SIZE,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size != VOCAB_SIZE:
            raise ValueError(f"data.vocab_size is {vocab_size} but the byte tokenizer has {VOCAB_SIZE} tokens; fix data.vocab_size.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}.")
        self.settings = dict(n_modules=n_modules, windows_per_module=windows_per_module, context=context,
                             queries_per_module=queries_per_module, train_fraction=train_fraction, min_bytes=min_bytes)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.split: StdlibText | None = None
        self.metadata: dict[str, Tensor] = {}
        #: names of the values of a metadata column, for source ids that read well (``column_names["module"][m]``)
        self.column_names: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.split = load_stdlib_text(**self.settings)
        self.metadata = {"module": self.split.module_of_window}
        self.column_names = {"module": self.split.modules}

    @property
    def text(self) -> StdlibText:
        """The loaded windows and continuations."""
        return self._require_setup()

    def query_dataset(self, kind: str = "test") -> TensorDataset:
        text = self._require_setup()
        if kind == "test":
            return TensorDataset(text.x_query, text.y_query)
        if kind == "train":
            return TensorDataset(text.x_train, text.y_train)
        raise ValueError(f"unknown query kind {kind!r} for stdlib_text; expected 'test' (held-out continuations) or 'train'.")

    def display_queries(self, kind: str = "test") -> list[str]:
        """Each query as text: the end of its context, then ``» `` and the scored continuation."""
        text = self._require_setup()
        if kind == "train":
            return [decode(x) for x in text.x_train]
        self.query_dataset(kind)  # the same error for an unknown kind
        out = []
        for q in range(len(text.x_query)):
            context, continuation = text.continuation(q)
            out.append(f"{context[-80:]}» {continuation}")
        return out
