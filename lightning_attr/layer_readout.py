"""The linear readout with the weight tangents of Linear / Conv layers applied as one matrix product per layer.

The linear readout (:mod:`readout`) of a response ``r_b`` is ``d/de f_q(theta + e r_b)`` at ``e = 0``. By
linearity it splits over parameters. For a layer ``y = W x + c`` (``nn.Linear``, or ``nn.ConvNd``: ``W * x + c``)
the part that comes from the tangent ``dW_b`` of its weight is ``dW_b x``, added to the tangent of the layer's
output; ``x`` is the layer's input at ``theta``, the same for every source. So it is computed for all ``S`` sources
at once, outside ``vmap``:

- Linear: ``x @ dW.view(S * out, in).T``, one matrix product that reads each weight tangent once;
- Conv: one convolution of ``x`` with ``S * C_out`` output channels (``dW.view(S * C_out, C_in, *k)``);

and fed into the ``vmap(jvp)`` pass as a tangent added to the layer's output (a forward hook), in which the layer's
weight is a constant. What remains vmapped is the tangent of the activations (a batched activation times an
unbatched weight: one matrix product or convolution over ``S x B`` rows) and the tangents of every other parameter,
biases included (small; a bias tangent also spares forward AD the zero tangent of a first layer's output, which it
adds through a slow decomposition), LayerNorm, embeddings, recurrent layers, ...: today's flat path.

The weight tangents must be contiguous per layer: :class:`SplitResponses` holds ``Tensor[S, P]`` responses with
each handled weight as its own ``Tensor[S, *shape]`` block and the rest as ``Tensor[S, P_rest]`` (laid out once, when
a member is read from the store).

Handled: modules whose type is exactly ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (``groups=1``, ``padding_mode="zeros"``)
whose ``weight`` is a trainable parameter of their own. Every other parameter takes the generic path. If a handled
weight is used outside its layer's own forward (tied weights, a weight penalty in the measurement), the scores
would miss that use: the capture pass sees every torch call (a ``TorchFunctionMode``) and the whole readout then
takes the generic path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_attr.functional import FunctionalModel
from lightning_attr.parameters import ParameterSpace

_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class _Layer:
    """A handled layer: its module, the name of its weight in the space, and its product with weight tangents."""

    module: nn.Module
    weight: str

    def names(self, attributes: Sequence[str] = ("weight", "bias")) -> tuple[str, ...]:
        """The names in the space of the layer's parameters ``attributes`` (``weight`` -> ``<prefix>.weight``)."""
        prefix = self.weight[: -len("weight")]
        return tuple(prefix + a for a in attributes)

    def weight_tangent(self, x: Tensor, dw: Tensor) -> tuple[Tensor, int]:
        """The layer output's tangent from its weight tangents, for ``n`` sources at once.

        Args:
            x: the layer's input at ``theta`` (``[*, in]`` Linear; ``[B, C_in, *L]`` or ``[C_in, *L]`` Conv).
            dw: ``Tensor[n, *weight.shape]`` contiguous.

        Returns:
            ``(t, dim)``: ``dW_b x`` (Linear) or ``dW_b * x`` (Conv) per source ``b``, indexed by dimension ``dim`` of
            ``t`` (``t.movedim(dim, 0)``: ``Tensor[n, *output.shape]``). A batched convolution keeps the sources at
            dimension 1, where the one convolution with ``n * out`` output channels puts them (``vmap`` reads them
            there; moving them first would make every later pass over the tangent strided).
        """
        n, out = dw.shape[0], dw.shape[1]
        if isinstance(self.module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])  # [N, in]
            if rows.shape[0] == 1:  # one matrix-vector product over every weight tangent (memory-bound)
                t = (rows @ dw.view(n * out, -1).T).view(n, 1, out)
            else:  # one [N, in] x [in, out] product per source, written contiguous as [n, N, out]
                t = torch.matmul(rows, dw.transpose(1, 2))
            return t.reshape(n, *x.shape[:-1], out), 0
        m = self.module
        single = x.dim() == dw.dim() - 2 or x.shape[0] == 1  # one image: [C_in, *L] or [1, C_in, *L]
        if single and isinstance(m, (nn.Conv1d, nn.Conv2d)) and not isinstance(m.padding, str):
            t = _unfolded_weight_tangent(m, x if x.dim() == dw.dim() - 2 else x[0], dw)
            return (t if x.dim() == dw.dim() - 2 else t.unsqueeze(1)), 0
        t = _CONVOLUTIONS[type(m)](x, dw.view(n * out, *dw.shape[2:]), None, m.stride, m.padding, m.dilation, 1)
        spatial = t.shape[-(dw.dim() - 3) :]
        if x.dim() == dw.dim() - 1:  # batched input [B, C_in, *L] -> [B, n, out, *L']
            return t.view(t.shape[0], n, out, *spatial), 1
        return t.view(n, out, *spatial), 0


def _unfolded_weight_tangent(m: nn.Conv1d | nn.Conv2d, x: Tensor, dw: Tensor) -> Tensor:
    """``Tensor[n, out, *L']`` (a permuted view): the weight tangents of a 1D / 2D convolution of one input
    ``x: Tensor[C_in, *L]``, as one product of its patches (:func:`conv_patches`, ``[C_in * k, L']``) with every weight
    tangent: ``patches^T [L', C_in * k] @ dW.view(n * out, C_in * k)^T``. The convolution with ``n * out`` output
    channels runs the transposed product (``_slow_conv2d_forward``: weights times the few patch columns), which MKL did
    1.6-2x slower on the bench's CNNs (one query, digits 8x8 and MNIST-1D)."""
    n, out, dims = dw.shape[0], dw.shape[1], dw.dim() - 3
    patches, spatial = conv_patches(m, x.unsqueeze(0))
    t = (patches[0].T @ dw.view(n * out, -1).T).view(*spatial, n, out)  # [*L', n, out]
    return t.permute(dims, dims + 1, *range(dims))


def conv_patches(m: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(patches: Tensor[B, C_in * k, L'], spatial)``: the patches (``F.unfold``) that the convolution ``m`` multiplies
    by its weight ``W.view(out, C_in * k)`` for inputs ``x: Tensor[B, C_in, *L]`` (``L' = prod(spatial)``, the output's
    positions). A 1D convolution is unfolded as a 2D one of height 1; ``padding="same"`` / ``"valid"`` as the
    explicit zero padding torch applies (the extra one of an even kernel on the right)."""
    dims = x.dim() - 2
    if isinstance(m.padding, str):
        pads = [(0, 0) if m.padding == "valid" else (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for d, k in zip(m.dilation, m.kernel_size)]  # fmt: skip
        x, padding = F.pad(x, [p for pair in reversed(pads) for p in pair]), (0,) * dims
    else:
        padding = m.padding
    lift = (lambda v, pad: (pad, v[0])) if dims == 1 else (lambda v, pad: tuple(v))  # 1D as 2D of height 1
    image = x.unsqueeze(2) if dims == 1 else x  # [B, C_in, 1, L] or [B, C_in, H, W]
    patches = F.unfold(image, lift(m.kernel_size, 1), lift(m.dilation, 1), lift(padding, 0), lift(m.stride, 1))
    spatial = tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(x.shape[2:], padding, m.dilation, m.kernel_size, m.stride)
    )
    return patches, spatial


def weight_rows(module: nn.Module, delta: Tensor, x: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``(D: Tensor[rows, R, out], X: Tensor[rows, R, in])`` of one call of an ``nn.Linear`` / ``nn.Conv1d`` /
    ``nn.Conv2d`` layer on ``rows`` examples, so that example ``i``'s weight gradient is ``D_i^T X_i`` (a convolution's
    as ``W.view(out, C_in x k)``): ``delta`` is the gradient at the layer's output (``rows`` times one example's output
    shape), ``x`` its input (``rows`` inputs in any leading layout, e.g. ``[E, Q, *shape]``). A Linear layer's rows are
    its input's leading dimensions after the example's (``R = 1`` on a vector); a convolution's are its ``R`` output
    positions, ``X`` their unfolded input patches (:func:`conv_patches`)."""
    if isinstance(module, nn.Linear):
        return delta.reshape(rows, -1, delta.shape[-1]), x.reshape(rows, -1, x.shape[-1])
    patches, _ = conv_patches(module, x.reshape(rows, *x.shape[1 - module.weight.dim() :]))  # [rows, C_in k, R]
    return delta.reshape(rows, module.out_channels, -1).transpose(1, 2).contiguous(), patches.transpose(1, 2).contiguous()


def handled_layers(module: nn.Module, space: ParameterSpace) -> tuple[_Layer, ...]:
    """The layers of ``module`` whose weight tangents :func:`linear_scores` applies as matrix products: modules of
    type exactly ``nn.Linear`` / ``nn.ConvNd`` (``groups=1``, zero padding) whose weight is a parameter of the space,
    with their class's own ``forward`` and no forward hook that could change their output (none when a global forward
    hook is registered)."""
    if getattr(nn.modules.module, "_global_forward_hooks", None):  # torch's registry of global forward hooks
        return ()
    trainable = set(space.names)
    layers = []
    for prefix, m in module.named_modules():
        if "forward" in m.__dict__ or m._forward_hooks:
            continue
        if type(m) is nn.Linear or (type(m) in _CONVOLUTIONS and m.groups == 1 and m.padding_mode == "zeros"):
            weight = f"{prefix}.weight" if prefix else "weight"
            if isinstance(m._parameters.get("weight"), nn.Parameter) and weight in trainable:
                layers.append(_Layer(m, weight))
    return tuple(layers)


def layer_parameters(layers: Sequence[_Layer]) -> tuple[str, ...]:
    """The names of the weights of ``layers`` (their responses are held as contiguous blocks)."""
    return tuple(layer.weight for layer in layers)


@dataclass(frozen=True)
class SplitResponses:
    """``Tensor[S, P]`` responses split per parameter: each handled layer's weight contiguous on its own.

    Holds ``S x P`` numbers once, like the flat tensor (:meth:`flat` gives its rows back).

    Attributes:
        space: the parameter space (its order is the flat order).
        blocks: ``{name: Tensor[S, *shape]}`` contiguous, one per split parameter (the handled weights).
        rest: ``Tensor[S, P_rest]`` contiguous, every other parameter in space order.
    """

    space: ParameterSpace
    blocks: dict[str, Tensor]
    rest: Tensor

    @property
    def num_sources(self) -> int:
        return int(self.rest.shape[0])

    @property
    def rest_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.space.names if n not in self.blocks)

    @classmethod
    def from_shards(
        cls, shards: Iterable[tuple[Tensor, Tensor]], num_sources: int, space: ParameterSpace, split: Sequence[str],
        device: torch.device | str = "cpu",
    ) -> SplitResponses:
        """Lays out ``(sources: LongTensor[S_shard], rows: Tensor[S_shard, P])`` shards (every source once; a source
        never given stays NaN) per parameter, one shard in memory at a time besides the result."""  # fmt: skip
        split = set(split)
        shapes = dict(zip(space.names, space.shapes))
        blocks = {n: torch.full((num_sources, *shapes[n]), float("nan"), device=device) for n in space.names if n in split}
        rest_names = [n for n in space.names if n not in split]
        rest_size = sum(numel for n, numel in zip(space.names, space.numels) if n not in split)
        rest = torch.full((num_sources, rest_size), float("nan"), device=device)
        for sources, rows in shards:
            sources, per_name = sources.to(device), space.unflatten(rows.to(device))
            for name, block in blocks.items():
                block[sources] = per_name[name]
            if rest_size:
                rest[sources] = _concatenated(per_name, rest_names, sources.numel())
        return cls(space, blocks, rest)

    @classmethod
    def from_flat(cls, responses: Tensor, space: ParameterSpace, split: Sequence[str]) -> SplitResponses:
        rows = torch.arange(responses.shape[0], device=responses.device)
        return cls.from_shards([(rows, responses)], responses.shape[0], space, split, responses.device)

    def rows(self, index: slice | Tensor) -> SplitResponses:
        """The responses of the sources ``index`` (a slice gives contiguous views, no copy)."""
        return SplitResponses(self.space, {n: b[index] for n, b in self.blocks.items()}, self.rest[index])

    def flat(self, index: slice | Tensor = slice(None)) -> Tensor:
        """``Tensor[n, P]`` in the space's order for the sources ``index`` (a copy)."""
        rest = self.rest[index]
        numels = [numel for name, numel in zip(self.space.names, self.space.numels) if name not in self.blocks]
        parts = dict(zip(self.rest_names, rest.split(numels, dim=1)))
        parts.update({name: block[index] for name, block in self.blocks.items()})
        return self.space.flatten(parts, batch_dims=1)

    def times(self, vectors: Tensor) -> Tensor:
        """``vectors @ responses.T``: ``Tensor[B, P] -> Tensor[B, S]``, one matrix product per block, no flat copy."""
        per_name = self.space.unflatten(vectors)
        out = _concatenated(per_name, self.rest_names, vectors.shape[0]) @ self.rest.T
        for name, block in self.blocks.items():
            out += per_name[name].reshape(vectors.shape[0], -1) @ block.view(block.shape[0], -1).T
        return out

    def to(self, device: torch.device | str) -> SplitResponses:
        return SplitResponses(self.space, {n: b.to(device) for n, b in self.blocks.items()}, self.rest.to(device))


def source_count(responses: Tensor | SplitResponses) -> int:
    """``S``: the sources of flat ``Tensor[S, P]`` responses or of :class:`SplitResponses`."""
    return responses.num_sources if isinstance(responses, SplitResponses) else int(responses.shape[0])


def source_rows(responses: Tensor | SplitResponses, index: slice | Tensor) -> Tensor:
    """``Tensor[n, P]``: the flat responses of the sources ``index`` (a view of flat responses, a copy of split ones)."""
    return responses.flat(index) if isinstance(responses, SplitResponses) else responses[index]


def _concatenated(per_name: dict[str, Tensor], names: Sequence[str], rows: int) -> Tensor:
    """``Tensor[rows, sum of numels]``: the parameters ``names`` of ``per_name`` (``{name: Tensor[rows, *shape]}``,
    :meth:`ParameterSpace.unflatten`) side by side in that order."""
    if not names:
        return next(iter(per_name.values())).new_zeros(rows, 0)
    return torch.cat([per_name[n].reshape(rows, -1) for n in names], dim=1)


def linear_scores(
    model: FunctionalModel,
    theta: Tensor,
    responses: SplitResponses,
    batch: Any,
    layers: Sequence[_Layer],
    chunk_size: int,
) -> Tensor | None:
    """``Tensor[B, S]``: the linear readout's scores (:func:`readout.score_sources`), with the handled ``layers``'
    weight tangents applied as matrix products. ``None`` when a parameter of ``layers`` is used outside its layer's
    forward for this batch (the caller takes the generic path).

    Args:
        theta: ``Tensor[P]`` float32. responses: split at exactly the parameters of ``layers``.
        batch: the query batch, ``B`` queries. chunk_size: sources per vmapped call.
    """
    if set(responses.blocks) != set(layer_parameters(layers)):
        raise ValueError("responses are split at other parameters than the handled layers' (SplitResponses.from_flat).")
    params = model.space.unflatten(theta)
    captured = capture_layers(model, params, batch, layers)
    if captured is None:
        return None
    inputs, outputs = captured
    zeros = [[torch.zeros_like(y) for y in ys] for ys in outputs]
    constants = {n: params[n] for n in layer_parameters(layers)}
    rest_names = responses.rest_names
    rest_shapes = [params[n].shape for n in rest_names]
    rest_numels = [params[n].numel() for n in rest_names]

    def measure(rest: Tensor | None, added: list[list[Tensor]]) -> Tensor:
        values = dict(constants)
        if rest is not None:
            values.update({n: v.view(s) for n, v, s in zip(rest_names, rest.split(rest_numels), rest_shapes)})
        with adding_to_outputs(layers, added):
            return model.measurement(values, batch)

    if rest_names:
        rest_primal = torch.cat([params[n].reshape(-1) for n in rest_names])
        one = lambda r, t: jvp(measure, (rest_primal, zeros), (r, t))[1]  # noqa: E731
    else:
        one = lambda r, t: jvp(lambda added: measure(None, added), (zeros,), (t,))[1]  # noqa: E731
    chunks = []
    for start in range(0, responses.num_sources, chunk_size):
        part = responses.rows(slice(start, start + chunk_size))
        pairs = [[layer.weight_tangent(x, part.blocks[layer.weight]) for x in xs] for layer, xs in zip(layers, inputs)]
        tangents, dims = [[t for t, _ in calls] for calls in pairs], [[d for _, d in calls] for calls in pairs]
        batched = vmap(one, in_dims=(0 if rest_names else None, dims))
        chunks.append(batched(part.rest if rest_names else None, tangents))
    return torch.cat(chunks, dim=0).T


class _ForeignUses(TorchFunctionMode):
    """Records the handled layers whose parameter tensors enter a torch call outside that layer's own forward."""

    def __init__(self, owner: dict[int, int]) -> None:
        super().__init__()
        self.owner, self.inside, self.foreign = owner, [], set()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inside = self.inside[-1] if self.inside else None
        for t in _tensors_in(args, kwargs.values() if kwargs else ()):
            layer = self.owner.get(id(t))
            if layer is not None and layer != inside:
                self.foreign.add(layer)
        return func(*args, **(kwargs or {}))


def _tensors_in(*groups: Iterable[Any]) -> Iterator[Tensor]:
    """The tensors among the arguments of a torch call, also inside (nested) lists, tuples and dicts: what
    ``tree_flatten`` would give for them, at a fraction of its cost (this runs for every call of a capture pass)."""
    for group in groups:
        for item in group:
            if isinstance(item, Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from _tensors_in(item)
            elif isinstance(item, dict):
                yield from _tensors_in(item.values())


def capture_layers(
    model: FunctionalModel, params: dict[str, Tensor], batch: Any, layers: Sequence[_Layer], owned: Sequence[str] = ("weight",)
) -> tuple[list[list[Tensor]], list[list[Tensor]]] | None:
    """One forward pass at ``params`` (no gradients): per layer and per call, its input and its output. ``None`` when a
    parameter ``owned`` by a layer (its attributes of these names that are parameters of the space) is used outside
    that layer's forward (:class:`_ForeignUses`)."""
    with capturing(params, layers, owned) as seen, torch.no_grad():
        model.measurement(params, batch)
    return None if seen.foreign else (seen.inputs, seen.outputs)


@dataclass
class Captured:
    """What :func:`capturing` saw of one forward pass, per layer (in ``layers``' order) and per call of it.

    Attributes:
        inputs: each call's input (a copy: a later in-place op, ``ReLU(inplace=True)`` or ``x += ...``, keeps it).
        outputs: each call's output (a copy), or its shape where only shapes were asked for.
        foreign: whether a parameter owned by a layer entered a torch call outside that layer's forward.
    """

    inputs: list[list[Tensor]]
    outputs: list[list[Tensor | torch.Size]]
    foreign: bool = False


@contextlib.contextmanager
def capturing(
    params: dict[str, Tensor], layers: Sequence[_Layer], owned: Sequence[str] = ("weight",), shapes_only: bool = False
) -> Iterator[Captured]:
    """Hooks on ``layers`` and a :class:`_ForeignUses` mode around the forward pass the caller runs with the tensors
    ``params`` (the very objects its module sees: parameters are told apart by identity); yields the
    :class:`Captured` record, complete on exit. ``shapes_only``: the outputs' shapes, not copies."""
    seen = Captured([[] for _ in layers], [[] for _ in layers])
    mode = _ForeignUses({id(params[name]): i for i, layer in enumerate(layers) for name in layer.names(owned) if name in params})

    def enter(i: int) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.inputs[i].append(args[0].clone())
            mode.inside.append(i)

        return hook

    def leave(i: int) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            seen.outputs[i].append(output.shape if shapes_only else output.clone())
            mode.inside.pop()

        return hook

    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.module.register_forward_pre_hook(enter(i)).remove)
            stack.callback(layer.module.register_forward_hook(leave(i)).remove)
        with mode:
            yield seen
    seen.foreign = bool(mode.foreign)


@contextlib.contextmanager
def adding_to_outputs(layers: Sequence[_Layer], added: list[list[Tensor | None]], replace: bool = False) -> Iterator[None]:
    """Forward hooks that add ``added[i][k]`` to the output of call ``k`` of ``layers[i]`` (``None``: nothing). Of the
    same shape: a call whose output has another shape than in the capture pass (e.g. one example of a layout whose
    batch is not the first dimension) is an error rather than a broadcast. ``replace``: ``added[i][k]`` replaces the
    output instead (it holds the output's value, and its tangent)."""
    calls = [0] * len(layers)

    def add(i: int) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            k = calls[i]
            if k >= len(added[i]):
                raise RuntimeError(
                    f"{type(_module).__name__} ran more often than in the capture pass: the forward is not deterministic."
                )
            calls[i] += 1
            if added[i][k] is None:
                return output
            if output.shape != added[i][k].shape:
                raise RuntimeError(
                    f"{type(_module).__name__} returned shape {tuple(output.shape)}, {tuple(added[i][k].shape)} expected."
                )
            return added[i][k] if replace else output + added[i][k]

        return hook

    handles = [layer.module.register_forward_hook(add(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
