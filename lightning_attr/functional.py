"""The user's module seen as pure functions of a flat parameter vector ``theta: Tensor[P]``.

Everything runs through ``torch.func.functional_call`` on detached tensors with the module in eval
mode (dropout off, BatchNorm on running statistics, buffers cloned), so no ``.grad``, RNG draw or
buffer update can leak into training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from lightning_attr.parameters import ParameterSpace


class _MethodCaller(nn.Module):
    """Lets ``functional_call`` run any method of ``inner``, not only ``forward``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.inner, method)(*args)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own flag afterwards."""
    with _eval_mode(module, tuple(module.modules())):
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """:func:`eval_mode` of ``module``, whose submodules (``module.modules()``) are ``modules``. ``module.eval()`` is not
    called where it would change nothing (every submodule in eval mode already, none with its own ``train``), and only
    the flags that differ are set back: each ``nn.Module.__setattr__`` costs about a microsecond, and a query pays this
    at every ``attribute()`` call."""
    flags = [(m, m.training) for m in modules]
    if any(flag or type(m).train is not nn.Module.train for m, flag in flags):
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training is not flag:
                m.training = flag


def has_recurrent_layer(module: nn.Module) -> bool:
    """True when ``module`` holds an ``nn.RNNBase`` (RNN, GRU, LSTM)."""
    return _any_recurrent(module.modules())


def _any_recurrent(modules: Iterable[nn.Module]) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in modules)


@contextlib.contextmanager
def autodiff_kernels(module: nn.Module) -> Iterator[None]:
    """Selects kernels that ``torch.func`` can differentiate in forward mode, for the simulation's and
    the readout's own passes only (the flags are restored on exit, so training keeps its kernels).

    - the fused fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` is turned off
      (``aten::_transformer_encoder_layer_fwd`` has no forward-mode derivative);
    - ``scaled_dot_product_attention`` runs on the math backend (the flash / memory-efficient kernels
      have none either);
    - when the module holds an ``nn.RNNBase`` (RNN, GRU, LSTM), oneDNN and cuDNN are turned off: their
      fused RNN kernels have no forward-mode derivative. Only then: they also serve convolutions.
    """
    with _autodiff_kernels(has_recurrent_layer(module)):
        yield


@contextlib.contextmanager
def _autodiff_kernels(recurrent: bool) -> Iterator[None]:
    """:func:`autodiff_kernels` of a module that holds an ``nn.RNNBase`` (``recurrent``) or not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [torch.backends.mkldnn, torch.backends.cudnn] if recurrent else []
    fastpath = torch.backends.mha.get_fastpath_enabled()
    enabled = [b.enabled for b in backends]
    torch.backends.mha.set_fastpath_enabled(False)
    for backend in backends:
        backend.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for backend, flag in zip(backends, enabled):
            backend.enabled = flag


@contextlib.contextmanager
def functional_view(
    module: nn.Module, space: ParameterSpace | None = None, *, current: bool = True
) -> Iterator[tuple[FunctionalModel, Tensor | None]]:
    """Yields ``(FunctionalModel, theta: Tensor[P] float32)`` with everything set for side-effect-free work
    (``current=False``: ``theta`` is ``None``, for a caller that reads the module's weights only where it needs them).

    Leaves inference mode (``Trainer.predict``), enables autograd, puts the module in eval mode, forks
    the RNG and selects differentiable kernels (:func:`autodiff_kernels`), restoring all of it on exit. The module
    tree is walked once for both (a query pays this at every ``attribute()`` call).
    """
    modules = tuple(module.modules())
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(module)))
        stack.enter_context(_eval_mode(module, modules))
        stack.enter_context(_autodiff_kernels(_any_recurrent(modules)))
        model = FunctionalModel(module, space)
        yield model, model.space.current(module) if current else None


def _cuda_devices(module: nn.Module) -> list[int]:
    """The CUDA devices that hold ``module``'s parameters (whose RNG :func:`functional_view` forks); none without a
    look at the parameters where CUDA was never initialized (no tensor can be on a CUDA device then)."""
    if not torch.cuda.is_initialized():
        return []
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def to_float32(batch: Any) -> Any:
    """Casts the floating tensors of a batch to float32 (simulation and readout run in fp32)."""
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t, batch)


def uses_output_loss(module: nn.Module) -> bool:
    """True when the module defines ``attribution_outputs`` (so the GGN is available)."""
    from lightning_attr.mixin import AttributionMixin

    return type(module).attribution_outputs is not AttributionMixin.attribution_outputs


class FunctionalModel:
    """Pure functions of ``theta: Tensor[P]`` (float32) over an :class:`AttributionMixin` module.

    Call inside :func:`eval_mode`. All per-example functions return ``Tensor[B]``.
    """

    def __init__(self, module: nn.Module, space: ParameterSpace | None = None) -> None:
        self.module = module
        self.space = space or ParameterSpace.of(module)
        self.has_outputs = uses_output_loss(module)
        # the module's own caller, kept in its __dict__ (not a submodule: state_dict and modules() do not see it): an
        # nn.Module costs about 20 us to build, at every attribute() call
        self._caller = module.__dict__.get("_attribution_caller")
        if self._caller is None or self._caller.inner is not module:
            self._caller = module.__dict__["_attribution_caller"] = _MethodCaller(module)

    def _state(self, theta: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        params = theta if isinstance(theta, dict) else self.space.unflatten(theta)
        state = {f"inner.{n}": p for n, p in params.items()}
        for name, buf in self.module.named_buffers():
            state[f"inner.{name}"] = buf.detach().clone().float() if buf.is_floating_point() else buf.detach().clone()
        return state

    def call(self, theta: Tensor | dict[str, Tensor], method: str, *args: Any) -> Any:
        """``module.<method>(*args)`` with the parameters replaced by ``theta`` (flat, or a dict by name)."""
        return functional_call(self._caller, self._state(theta), (method, *args), strict=False)

    def outputs(self, theta: Tensor | dict[str, Tensor], batch: Any) -> Tensor:
        """Model outputs ``Tensor[B, ...]`` at ``theta`` (flat, or a dict by name)."""
        return self.call(theta, "attribution_outputs", batch)

    def output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example loss ``Tensor[B]`` from outputs (independent of theta)."""
        return self.module.attribution_output_loss(outputs, batch)

    def losses(self, theta: Tensor | dict[str, Tensor], batch: Any) -> Tensor:
        """Per-example training loss ``Tensor[B]`` at ``theta`` (flat, or a dict by name: differentiating with respect
        to the dict builds one ``[P]`` gradient, where the flat vector's slices add one zero-filled ``[P]`` per parameter)."""
        if self.has_outputs:
            return self.output_loss(self.outputs(theta, batch), batch)
        return self.call(theta, "attribution_loss", batch)

    def measurement(self, theta: Tensor, batch: Any) -> Tensor:
        """Per-example query measurement ``Tensor[B]`` (default: the loss) at ``theta``."""
        if self.has_outputs:
            return self.module.attribution_measurement(self.outputs(theta, batch), batch)
        return self.call(theta, "attribution_loss", batch)
