"""Exit points of an arbitrary model: finding the named modules, reading and replacing their outputs,
and one recording forward that finds the layers reading each exit point directly.

An exit point is a module whose output (the first element when it returns a tuple, a list or a
Hugging Face ``ModelOutput``) is read by an exit. ``record`` runs the model once with hooks on the exit
points and on every ``nn.Conv2d`` / ``nn.Linear``: what each exit point produced, in which order, and
which layers took an exit point's tensor itself as their input. Matching is by tensor identity, so it
works for models ``torch.fx`` cannot trace (data-dependent control flow, Hugging Face's), at the cost
of one forward on an example input.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Rebuild = Callable[[torch.Tensor], object]
"""Puts a replacement tensor where an exit point's output had its first tensor."""


def find_exit_modules(model: nn.Module, exits: object) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each name of ``exits`` (qualified names as ``model.named_modules()`` spells
    them). ValueError naming the argument for an empty, duplicated or unknown name (with the closest ones)."""
    if isinstance(exits, str) or not isinstance(exits, Sequence) or not exits:
        raise TypeError(f"exits must be a non-empty list of module names, got {exits!r}")
    modules = dict(model.named_modules())
    found = []
    for name in exits:
        if not isinstance(name, str) or not name:
            raise TypeError(f"exits must hold module names (non-empty str), got {name!r}")
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; closest names: {close}" if close else "; list them with model.named_modules()"
            raise ValueError(f"exits: {name!r} is not a module of the model{hint}")
        found.append((name, modules[name]))
    duplicates = sorted({name for name in exits if list(exits).count(name) > 1})
    if duplicates:
        raise ValueError(f"exits must name each exit point once, got {duplicates} more than once")
    same = [name for name, module in found if sum(module is other for _, other in found) > 1]
    if same:
        raise ValueError(f"exits {same} name the same module (one module held under several names)")
    return found


def split_output(output: object, name: str) -> tuple[torch.Tensor, Rebuild]:
    """The tensor an exit point hands on (its output, or the first element of a tuple, list or
    ``ModelOutput``) and a function that rebuilds the output with another tensor in its place."""
    if isinstance(output, torch.Tensor):
        return output, lambda tensor: tensor
    if isinstance(output, dict) and output:  # ModelOutput (an OrderedDict) and plain dicts
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            def rebuild_mapping(tensor: torch.Tensor) -> object:
                rebuilt = type(output)(output) if type(output) is dict else output.__class__(**output)
                rebuilt[key] = tensor
                return rebuilt
            return output[key], rebuild_mapping
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        rest = list(output[1:])
        if hasattr(output, "_make"):  # a namedtuple
            return output[0], lambda tensor: output._make([tensor, *rest])
        return output[0], lambda tensor: type(output)([tensor, *rest])
    raise TypeError(
        f"exits: the output of {name!r} must be a tensor, or a tuple, list or ModelOutput whose first element "
        f"is one, got {type(output).__name__}"
    )


def channel_axis(tensor: torch.Tensor, dim: int | None, name: str) -> int:
    """The non-negative channel axis of an exit point's tensor: ``dim``, or 1 for [N, C, H, W] and the
    last axis for tokens [N, T, D]. ValueError unless the tensor is 3-D or 4-D."""
    if tensor.dim() not in (3, 4):
        raise ValueError(
            f"exits: {name!r} outputs a tensor of shape {tuple(tensor.shape)}; an exit point must output a 3-D "
            "[N, T, D] or 4-D [N, C, H, W] tensor (name the module whose output is the feature map or hidden state)"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"exits: {name!r} outputs a {tensor.dtype} tensor; an exit point must be floating point")
    if dim is None:
        return 1 if tensor.dim() == 4 else 2
    rank = tensor.dim()
    if isinstance(dim, bool) or not isinstance(dim, int) or not -rank <= dim < rank or dim % rank == 0:
        raise ValueError(f"dim must be a channel axis other than the batch axis 0 (1 or -1), got {dim!r} "
                         f"for {name!r}'s output of shape {tuple(tensor.shape)}")
    return dim % rank


def partitionable(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``nn.Conv2d``'s or ``nn.Linear``'s forward (the class or a
    subclass that overrides neither), so a partitioned layer with its parameters computes the same."""
    if isinstance(module, nn.Conv2d):
        cls = type(module)
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def reads_on_its_channel_axis(module: nn.Module, input: torch.Tensor, axis: int) -> bool:
    """Whether ``module`` reads ``input`` with its input channels (features) on ``axis``: a convolution
    on a 4-D feature map's axis 1, a linear layer on the last axis."""
    if isinstance(module, nn.Conv2d):
        return input.dim() == 4 and axis == 1
    return axis == input.dim() - 1


@dataclass
class ExitPointRecord:
    """What one exit point did in the recording forward."""

    name: str
    output: torch.Tensor  # what the exit point produced (detached)
    handed_on: torch.Tensor  # what the layers after it read in its place
    calls: int = 0
    version: int = 0  # handed_on's version counter when handed on

    @property
    def modified_in_place(self) -> bool:
        """Whether a later layer wrote into the tensor handed on (an in-place ReLU, ``+=``)."""
        return self.handed_on._version != self.version


@dataclass
class Recording:
    """The recording forward's findings: ``order`` lists exit indices as they ran; ``readers[k]`` the
    layers (name, module) whose every call read exit point k's tensor on its channel axis; ``mixed``
    those that read it in some calls and other tensors in others (left plain)."""

    points: list[ExitPointRecord | None]
    order: list[int] = field(default_factory=list)
    readers: list[list[tuple[str, nn.Module]]] = field(default_factory=list)
    mixed: list[tuple[str, nn.Module]] = field(default_factory=list)
    result: object = None


def record(model: nn.Module, exit_modules: list[tuple[str, nn.Module]], run: Callable[[], object],
           hand_on: Callable[[int, torch.Tensor, int], torch.Tensor], dims: Sequence[int | None]) -> Recording:
    """Runs ``run()`` (a forward of ``model``) once in eval mode without gradient, with ``hand_on(k, y, axis)``
    replacing exit point k's tensor y (channels on ``axis``). Restores every module's training flag and removes its hooks."""
    recording = Recording(points=[None] * len(exit_modules))
    produced: dict[int, int] = {}  # id(tensor handed on) -> exit index; the records keep the tensors alive
    calls: dict[int, list[int | None]] = {}  # id(layer) -> exit index read by each call (None: another tensor)
    layers = {id(module): (name, module) for name, module in model.named_modules() if partitionable(module)}
    dims_found: list[int] = [0] * len(exit_modules)  # each exit point's channel axis, once it ran

    def on_exit(index: int, name: str):
        def hook(module, args, output):
            tensor, rebuild = split_output(output, name)
            point = recording.points[index]
            if point is not None:
                point.calls += 1
                return None
            axis = channel_axis(tensor, dims[index], name)
            handed_on = hand_on(index, tensor, axis)
            recording.points[index] = ExitPointRecord(name, tensor.detach(), handed_on, calls=1,
                                                      version=handed_on._version)
            recording.order.append(index)
            produced[id(handed_on)] = index
            dims_found[index] = axis
            return rebuild(handed_on)
        return hook

    def on_layer(module, args):
        read = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        if read is not None and not reads_on_its_channel_axis(module, args[0], dims_found[read]):
            read = None
        calls.setdefault(id(module), []).append(read)

    handles = [module.register_forward_hook(on_exit(k, name)) for k, (name, module) in enumerate(exit_modules)]
    handles += [module.register_forward_pre_hook(on_layer) for _, module in layers.values()]
    training = {id(module): module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            recording.result = run()
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.training = training[id(module)]

    recording.readers = [[] for _ in exit_modules]
    for key, reads in calls.items():
        indices = set(reads)
        if len(indices) == 1 and None not in indices:
            recording.readers[indices.pop()].append(layers[key])
        elif indices - {None}:
            recording.mixed.append(layers[key])
    return recording


def check_run_order(recording: Recording, exit_modules: list[tuple[str, nn.Module]]) -> None:
    """ValueError unless every exit point ran exactly once, in the order ``exits`` lists them."""
    names = [name for name, _ in exit_modules]
    missing = [names[k] for k, point in enumerate(recording.points) if point is None]
    if missing:
        raise ValueError(f"exits: the forward never reached {missing}; name modules that run in the model's forward")
    repeated = [(point.name, point.calls) for point in recording.points if point.calls > 1]
    if repeated:
        raise ValueError(f"exits: each exit point must run once per forward, but {repeated} ran more often "
                         "(a module reused in the forward); name a module that runs once")
    if recording.order != sorted(recording.order):
        ran = [names[k] for k in recording.order]
        raise ValueError(f"exits must be listed in the order they run: the forward ran them as {ran}")


def example_input(model: nn.Module) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a small forward for models whose input can be told from the model:
    Hugging Face models (from their config), timm models (``pretrained_cfg``), the package's models
    (``example_input``), and models whose first layer is a convolution (images of 224 x 224) or an
    embedding (token ids). ValueError asking for ``example_input`` otherwise."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "main_input_name"):
        return _hugging_face_input(model, config)
    if hasattr(model, "example_input") and callable(model.example_input):
        return (model.example_input(2),), {}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return (torch.randn(2, *cfg["input_size"]),), {}
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Embedding, nn.Linear))), None)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    if isinstance(first, nn.Conv2d):
        return (torch.randn(2, first.in_channels, 224, 224, device=device, dtype=dtype),), {}
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (2, 16), device=device),), {}
    raise ValueError(
        "example_input is needed: the input of this model cannot be told from its layers. Pass one batch the "
        "model accepts (a tensor, a tuple of positional arguments, or a dict of keyword arguments)"
    )


def _hugging_face_input(model: nn.Module, config) -> tuple[tuple, dict]:
    parameter = next(model.parameters())
    name = model.main_input_name
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else tuple(size)
        shape = (size, size) if isinstance(size, int) else size
        channels = getattr(config, "num_channels", 3)
        pixels = torch.randn(2, channels, *shape, device=parameter.device, dtype=parameter.dtype)
        return (), {name: pixels}
    length = min(16, getattr(config, "max_position_embeddings", 16))
    ids = torch.randint(0, getattr(config, "vocab_size", 2), (2, length), device=parameter.device)
    return (), {name: ids}


def as_call(example: object) -> tuple[tuple, dict]:
    """``example_input`` as ``(args, kwargs)``: a tensor is one argument, a tuple several, a dict keywords."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, dict):
        return (), dict(example)
    raise TypeError(f"example_input must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                    f"got {type(example).__name__}")


def exit_point_readers(model: nn.Module, exits: Sequence[str],
                       call: tuple[tuple, dict] | None) -> list[tuple[tuple[str, nn.Module], int]]:
    """``((name, layer), C)`` for every convolution and linear layer that reads one of the ``exits``' outputs
    directly in a forward of ``call`` (``(args, kwargs)``; None: ``example_input(model)``), C being the channels
    of the exit point it reads. The exit points must run once each, in order."""
    exit_modules = find_exit_modules(model, exits)
    args, kwargs = call if call is not None else example_input(model)
    recording = record(model, exit_modules, lambda: model(*args, **kwargs), lambda k, y, axis: y,
                       [None] * len(exit_modules))
    check_run_order(recording, exit_modules)
    channels = [point.output.shape[1] if point.output.dim() == 4 else point.output.shape[-1]
                for point in recording.points]
    return [(reader, channels[k]) for k, readers in enumerate(recording.readers) for reader in readers]
