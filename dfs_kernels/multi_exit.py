"""Deep Feature Surgery on any model: ``multi_exit(model, exits)`` names where its exits go.

    import torchvision
    net = dfs_kernels.multi_exit(torchvision.models.resnet18(num_classes=10), ["layer1", "layer2", "layer3"],
                                 num_classes=10)
    logits_1, logits_2, logits_3, final = net(images)

At every exit point y (a module's output, or its first element) everything downstream reads
``[y+, sg(y-)]`` and the exit's head reads ``[sg(y+), y-]`` (docs/semantics.md). Forward values do not
change. Each ``nn.Conv2d`` and ``nn.Linear`` that reads y itself runs as a ``PartitionedConv2d`` /
``PartitionedLinear`` with the same parameters, so the input gradient of the referenced channels is never
computed; other readers (residual adds, norms, pooling) read the rerouted view. Those readers are found
by one recording forward on an example input (``_exit_points``), so models that ``torch.fx`` cannot trace
work too.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from . import functional, reference
from ._exit_points import as_call, check_run_order, find_exit_modules, record, split_output
from ._exit_points import example_input as default_example_input
from ._validation import check_beta, check_shared_channels, shared_channels_for
from .backends import check_backend_name
from .models._common import EXIT_GRADS, FLAVOURS
from .nn import _replace, partitioned_like

__all__ = ["MultiExitModel", "PooledExitHead", "final_logits", "multi_exit"]


class PooledExitHead(nn.Module):
    """The default exit head: the mean over every axis but the batch and the channel axis ``dim``, then
    ``fc``. [N, C, H, W] (dim 1) or tokens [N, T, D] (dim -1) -> [N, num_classes]."""

    def __init__(self, channels: int, num_classes: int, *, dim: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(channels, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.dim % x.dim()
        return self.fc(x.mean(dim=[a for a in range(1, x.dim()) if a != axis]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def final_logits(output: object) -> torch.Tensor:
    """The logits in a model's own output: the output itself when it is a tensor, its ``logits``
    (Hugging Face's ``ModelOutput``), or the first element of a tuple. TypeError otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model's own output ({type(output).__name__}) holds no logits, which training needs for its final "
        "exit: wrap a model with a classification head (e.g. BertForSequenceClassification rather than BertModel)"
    )


class _StopForward(Exception):
    """Raised by an exit point's hook to end a forward early (``MultiExitModel.run_exits``)."""


class _ExitHook:
    """The forward hook of exit point ``index``: an object rather than a closure, so that deep copies
    and pickles of the wrapper carry hooks that point at the copy."""

    def __init__(self, owner: MultiExitModel, index: int) -> None:
        self.owner = owner
        self.index = index

    def __call__(self, module: nn.Module, args, output):
        return self.owner._at_exit_point(self.index, output)


class MultiExitModel(nn.Module):
    """A user's model with exits (built by ``multi_exit``; see its arguments).

    ``forward(*args, **kwargs)`` calls the model and returns a list: each exit's logits [N, num_classes],
    in ``exits`` order, then the model's own output unchanged. ``forward(..., return_features=True)``
    returns ``(logits, None)`` with the last entry the model's logits (``final_logits``), the form the
    training strategies call. ``.model`` is the user's model (its parameters, not copies), ``.heads`` the
    exits' heads; state_dict keys are ``model.*`` and ``heads.*``. ``remove()`` gives the model back as it
    was. ``describe()`` lists the exit points, their channel axis, Cp and the layers partitioned.
    """

    def __init__(self, model: nn.Module, exits: list[str], heads: Sequence[nn.Module], *, shared_channels: list[int],
                 dims: list[int], channels: list[int], flavour: str, exit_grad: str, backend: str,
                 swapped: Mapping[int, tuple[nn.Module, nn.Module]], partitioned: list[list[str]],
                 left_plain: list[str], copied: list[bool]) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.exits = list(exits)
        self.shared_channels = list(shared_channels)
        self.dims = list(dims)
        self.channels = list(channels)
        self.flavour, self.exit_grad, self.backend = flavour, exit_grad, backend
        self.partitioned = partitioned
        self.left_plain = left_plain
        self.copied = list(copied)  # exit points a later layer writes into in place: hand on a copy
        self._swapped = dict(swapped)  # id(partitioned layer) -> (partitioned layer, the user's layer)
        self._collected: list[torch.Tensor] = []
        self._collecting = False
        self._until: Callable[[int, torch.Tensor], bool] | None = None
        modules = dict(model.named_modules())
        self._removed = False  # a flag, not the handles: torch.compile cannot read hook handles
        self._handles = [modules[name].register_forward_hook(_ExitHook(self, k)) for k, name in enumerate(exits)]

    # --- forward ---------------------------------------------------------------------------------

    def _reroute(self, index: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the backbone reads, what exit ``index``'s head reads) for exit point tensor ``y``."""
        if self.flavour == "dsn":
            return y, y
        cp, dim = self.shared_channels[index], self.dims[index]
        if self.flavour == "dfs_eager":
            backbone, view = reference.reroute(y, cp, dim)
        else:
            backbone, view = functional.reroute(y, cp, dim=dim, backend=self.backend)
            if self.copied[index]:  # reroute's outputs are views of y, which autograd lets no one modify
                backbone = backbone.clone()
        return backbone, y if self.exit_grad == "all" else view

    def _at_exit_point(self, index: int, output: object) -> object:
        # The same computation in every call, also when activation checkpointing recomputes a block in the
        # backward (its saved tensors must come out as in the forward); only our own forward collects logits.
        y, rebuild = split_output(output, self.exits[index])
        backbone, view = self._reroute(index, y)
        logits = self.heads[index](view)
        if self._collecting:
            self._collected.append(logits)
            if self._until is not None and self._until(index, logits):
                raise _StopForward
        return rebuild(backbone)

    def _run(self, args, kwargs) -> tuple[list[torch.Tensor], object]:
        if self._removed:
            raise RuntimeError("this MultiExitModel was removed (remove() gave the model back); wrap it again")
        self._collected.clear()
        self._collecting = True
        try:
            output = self.model(*args, **kwargs)
        finally:
            self._collecting = False
        logits = list(self._collected)
        self._collected.clear()
        if len(logits) != len(self.exits):
            raise RuntimeError(f"the forward reached {len(logits)} of the {len(self.exits)} exit points {self.exits}")
        return logits, output

    def forward(self, *args, return_features: bool = False, **kwargs):
        logits, output = self._run(args, kwargs)
        if return_features:
            return logits + [final_logits(output)], None
        return logits + [output]

    def run_exits(self, *args, until: Callable[[int, torch.Tensor], bool], **kwargs) -> list[torch.Tensor]:
        """The forward for early exit: after each exit k, ``until(k, logits)`` decides whether to stop;
        returns the logits of the exits that ran, and the model's (``final_logits``) if it ran to the end."""
        self._until = until
        try:
            logits, output = self._run(args, kwargs)
        except _StopForward:
            logits = list(self._collected)
            self._collected.clear()
            return logits
        finally:
            self._until = None
        return logits + [final_logits(output)]

    # --- inspection and undo ---------------------------------------------------------------------

    def describe(self) -> str:
        """One line per exit point: its name, channel axis, C and Cp, the head, and the layers that read
        it and run partitioned (their input gradient on [Cp, C) is never computed)."""
        lines = [f"MultiExitModel({type(self.model).__name__}, flavour={self.flavour!r}, exit_grad={self.exit_grad!r}, "
                 f"backend={self.backend!r})"]
        for k, name in enumerate(self.exits):
            partitioned = ", ".join(self.partitioned[k]) or "none"
            copied = "  (handed on as a copy: a later layer modifies it in place)" if self.copied[k] else ""
            lines.append(f"  exit {k + 1}: {name!r}  dim={self.dims[k]}  C={self.channels[k]}  Cp={self.shared_channels[k]}  "
                         f"head={type(self.heads[k]).__name__}  partitioned: {partitioned}{copied}")
        if self.left_plain:
            lines.append(f"  left plain (they also read other tensors): {', '.join(self.left_plain)}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return (f"exits={self.exits}, shared_channels={self.shared_channels}, flavour={self.flavour!r}, "
                f"exit_grad={self.exit_grad!r}, backend={self.backend!r}")

    def remove(self) -> nn.Module:
        """Removes the exit hooks and puts the user's own layers back where partitioned ones ran; returns
        the model exactly as it was given (same modules, same parameters, same state_dict)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._removed = [], True
        _replace(self.model, {key: original for key, (_, original) in self._swapped.items()})
        self._swapped = {}
        return self.model


def _shared_counts(shared_channels, beta: float, count: int) -> Callable[[int, int], int]:
    """Cp of exit point k given its channel count: from ``shared_channels`` (an int or one per exit) or
    round(beta * C)."""
    if shared_channels is None:
        return lambda k, channels: shared_channels_for(channels, beta)
    values = [shared_channels] * count if isinstance(shared_channels, numbers.Integral) else list(shared_channels)
    if len(values) != count:
        raise ValueError(f"shared_channels must be an int or one int per exit ({count}), got {shared_channels!r}")

    def given(k: int, channels: int) -> int:
        check_shared_channels(values[k], channels)
        return int(values[k])
    return given


def _check_options(model, beta, heads, flavour, exit_grad, backend) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, MultiExitModel):
        raise ValueError("model is already a MultiExitModel; wrap the user's model once (call remove() to start over)")
    hooked = [name for name, module in model.named_modules()
              if any(isinstance(hook, _ExitHook) for hook in module._forward_hooks.values())]
    if hooked:
        raise ValueError(f"model is already wrapped by multi_exit (exit points {hooked}); call remove() on that "
                         "MultiExitModel first")
    check_beta(beta)
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if exit_grad not in EXIT_GRADS:
        raise ValueError(f"exit_grad must be one of {EXIT_GRADS}, got {exit_grad!r}")
    check_backend_name(backend)
    if heads is not None and not (isinstance(heads, Mapping)
                                  and all(isinstance(h, nn.Module) for h in heads.values())):
        raise TypeError(f"heads must be a dict {{exit name: nn.Module}}, got {type(heads).__name__}")


def _check_head(head: nn.Module, name: str, view: torch.Tensor) -> None:
    """Runs ``head`` once (eval mode, no gradient) on the recorded exit point; TypeError/ValueError
    naming the exit unless it returns [N, K] logits."""
    training = {id(m): m.training for m in head.modules()}
    try:
        head.eval()
        with torch.no_grad():
            logits = head(view)
    finally:
        for module in head.modules():
            module.training = training[id(module)]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != view.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"heads[{name!r}] must return logits [N, K] with N = {view.shape[0]} for the exit point's "
                         f"output {tuple(view.shape)}, got {shape}")


def multi_exit(
    model: nn.Module,
    exits: Sequence[str],
    *,
    beta: float = 0.5,
    shared_channels: int | Sequence[int] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    num_classes: int | None = None,
    dim: int | None = None,
    backend: str = "auto",
    flavour: str = "dfs",
    exit_grad: str = "partitioned",
    example_input: object = None,
) -> MultiExitModel:
    """Puts exits on ``model`` at the modules named in ``exits`` and trains them with Deep Feature Surgery.

    Args:
        model: any ``nn.Module`` (torchvision, timm, Hugging Face, your own); its parameters are used, not copied.
        exits: qualified module names (as ``model.named_modules()`` spells them) whose output (the first element
            of a tuple or ``ModelOutput``) is an exit point, in the order they run. Each must output a 3-D
            [N, T, D] or 4-D [N, C, H, W] floating tensor and run once per forward.
        beta: fraction of shared channels at each exit point; Cp = round(beta * C).
        shared_channels: Cp as an int (every exit point) or one int per exit; overrides ``beta``.
        heads: optional ``{exit name: module}`` mapping the exit view to logits [N, K]. The others get a
            ``PooledExitHead`` (mean over space or tokens, then a Linear), for which ``num_classes`` is needed.
        dim: the channel axis; default 1 for 4-D exit points and -1 for 3-D ones.
        backend: backend of the DFS ops ("auto" or a name from ``dfs_kernels.available_backends()``).
        flavour: "dfs" (the package's ops), "dfs_eager" (``dfs_kernels.reference``: split, detach, cat) or
            "dsn" (plain multi-exit training, no stop-gradient).
        exit_grad: "partitioned" (heads reach only y-) or "all" (heads reach every channel); beta = 1 with
            "all" is DSN.
        example_input: one batch the model accepts (a tensor, a tuple of arguments or a dict of keyword
            arguments), run once without gradient to find the exit points' shapes and their readers. Default:
            told from the model where possible (``_exit_points.example_input``).

    Returns:
        A ``MultiExitModel``. Raises TypeError/ValueError naming the argument for bad input: an unknown
        exit name (with the closest names), duplicates, exits out of run order or never reached, an exit
        point that is not a 3-D/4-D tensor, a head that does not return [N, K], beta or shared_channels
        out of range, a model already wrapped.
    """
    _check_options(model, beta, heads, flavour, exit_grad, backend)
    exit_modules = find_exit_modules(model, exits)
    names = [name for name, _ in exit_modules]
    heads = dict(heads or {})
    unknown = sorted(set(heads) - set(names))
    if unknown:
        raise ValueError(f"heads has keys {unknown} that are not in exits {names}")
    if len(heads) < len(names) and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int for the default heads of exits "
                         f"{[n for n in names if n not in heads]}, got {num_classes!r}")
    shared_count = _shared_counts(shared_channels, beta, len(names))
    cps, axes = [0] * len(names), [1] * len(names)

    def hand_on(k: int, y: torch.Tensor, axis: int) -> torch.Tensor:
        cps[k], axes[k] = shared_count(k, y.shape[axis]), axis
        return y if flavour == "dsn" else reference.partition(y, cps[k], axis)

    args, kwargs = as_call(example_input) if example_input is not None else default_example_input(model)
    recording = record(model, exit_modules, lambda: model(*args, **kwargs), hand_on, [dim] * len(names))
    check_run_order(recording, exit_modules)

    dims, built = [], []
    for k, name in enumerate(names):
        y = recording.points[k].output
        # tokens keep the familiar -1; other axes keep their index
        dims.append(-1 if axes[k] == y.dim() - 1 and y.dim() == 3 else axes[k])
        head = heads.get(name) or PooledExitHead(y.shape[axes[k]], num_classes, dim=dims[k], device=y.device,
                                                 dtype=y.dtype)
        _check_head(head, name, y)
        built.append(head)

    swapped, partitioned = {}, [[] for _ in names]
    if flavour == "dfs":
        for k, readers in enumerate(recording.readers):
            for layer_name, layer in readers:
                replacement = partitioned_like(layer, cps[k], backend)
                swapped[id(replacement)] = (replacement, layer)
                partitioned[k].append(layer_name)
        _replace(model, {id(original): replacement for replacement, original in swapped.values()})
    channels = [recording.points[k].output.shape[axes[k]] for k in range(len(names))]
    return MultiExitModel(model, names, built, shared_channels=cps, dims=dims, channels=channels, flavour=flavour,
                          exit_grad=exit_grad, backend=backend, swapped=swapped, partitioned=partitioned,
                          left_plain=[name for name, _ in recording.mixed],
                          copied=[point.modified_in_place for point in recording.points])
