"""Per-exit parameter counts and FLOPs of the multi-exit models, cumulative as the MSDNet literature
reports them: exit k counts everything the forward has run up to and including classifier k (so the
earlier classifiers too), which is the cost of anytime prediction up to exit k.

    python -m dfs_kernels.models.summary --model vgg7

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and matrix
products (2 FLOPs per multiply-add) and nothing else: the MSDNet literature's "FLOPs" are
multiply-adds, i.e. half these. They are counted on the "dsn" flavour, whose forward is the same
computation as the DFS flavours' (the counter cannot count the "triton" backend's kernels).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import MODEL_ALIASES, MODELS, MultiExitNetwork, build_model, canonical_model_name


def exit_costs(model: MultiExitNetwork, batch_size: int = 1) -> list[dict[str, int]]:
    """One dict per exit, shallow to deep: ``params`` (parameters of every module run up to and
    including that exit) and ``flops`` (FLOPs of one forward up to that exit, per image), both
    cumulative. Runs one forward of ``batch_size`` random inputs (``model.example_input``) in eval mode."""
    seen_parameters: set[int] = set()
    parameter_count = 0

    def count_parameters(module: nn.Module, args) -> None:
        nonlocal parameter_count
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in seen_parameters:
                seen_parameters.add(id(parameter))
                parameter_count += parameter.numel()

    costs: list[dict[str, int]] = []
    counter = FlopCounterMode(display=False)

    def record_exit(module: nn.Module, args, output) -> None:
        costs.append({"params": parameter_count, "flops": counter.get_total_flops() // batch_size})

    handles = [module.register_forward_pre_hook(count_parameters) for module in model.modules()]
    handles += [module.register_forward_hook(record_exit) for module in model.exit_modules()]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        images = model.example_input(batch_size).to(parameter.device)
        if images.is_floating_point():
            images = images.to(parameter.dtype)
        with torch.no_grad(), counter:
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return costs


def unused_at_inference(model: MultiExitNetwork) -> dict[str, int]:
    """Parameter count per module (by name) whose parameters the inference forward never uses, such as
    ResNet-18's adaptation layers, which only feature distillation reads in training."""
    ran: set[int] = set()
    handles = [module.register_forward_pre_hook(lambda module, args: ran.add(id(module)))
               for module in model.modules()]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *model.input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: sum(p.numel() for p in module.parameters(recurse=False))
            for name, module in model.named_modules()
            if id(module) not in ran and any(True for _ in module.parameters(recurse=False))}


def format_table(name: str, costs: list[dict[str, int]], total_params: int,
                 unused: dict[str, int] | None = None) -> str:
    """A text table of ``exit_costs``: params (M), GFLOPs and G multiply-adds per exit; ``unused``
    (``unused_at_inference``) explains why the total exceeds the last exit's count."""
    lines = [
        f"{name}: {len(costs)} exits, {total_params / 1e6:.3f} M parameters in all (cumulative per exit below)",
    ]
    if unused:
        lines.append(f"  of which {sum(unused.values()) / 1e6:.3f} M are used in training only, not counted at any "
                     f"exit ({', '.join(unused)}; e.g. feature distillation's adaptation layers)")
    lines.append(f"{'exit':>4} {'params (M)':>11} {'GFLOPs':>9} {'GMACs':>9}")
    for index, cost in enumerate(costs, start=1):
        lines.append(
            f"{index:>4} {cost['params'] / 1e6:>11.3f} {cost['flops'] / 1e9:>9.4f} {cost['flops'] / 2e9:>9.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS) + sorted(MODEL_ALIASES), default="vgg7")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the model's dataset (100 or 1000)")
    parser.add_argument("--growth-rate", type=int, default=None, help="MSDNet only")
    args = parser.parse_args(argv)
    args.model = canonical_model_name(args.model)
    kwargs = {"flavour": "dsn"}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.growth_rate is not None:
        if not args.model.startswith("msdnet"):
            parser.error("--growth-rate applies to MSDNet only")
        kwargs["growth_rate"] = args.growth_rate
    model = build_model(args.model, **kwargs)
    total = sum(parameter.numel() for parameter in model.parameters())
    print(format_table(args.model, exit_costs(model), total, unused_at_inference(model)))


if __name__ == "__main__":
    main()
