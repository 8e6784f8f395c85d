"""A ``MultiExitModel`` in the rest of the package: the training strategies, ``torch.compile``, export and
inference (anytime, budgeted, early exit, FLOPs), on a small plain CNN and a small Hugging Face ResNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfs_kernels
from dfs_kernels import inference
from dfs_kernels.testing import assert_close
from dfs_kernels.training import (BlockDependentLosses, DeepFeatureSurgery, GradientDeconfliction, JointTraining,
                                  SelfDistillationLoss, project_conflicting)

NUM_CLASSES = 5
EXITS = ["1", "3"]  # the ReLUs after the first two convolutions


def plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, NUM_CLASSES))


def backend() -> str:
    return "aten" if "aten" in dfs_kernels.available_backends("cpu") else "reference"


def wrapped(flavour: str = "dfs", *, dtype=torch.float64, model: nn.Module | None = None) -> dfs_kernels.MultiExitModel:
    torch.manual_seed(0)
    model = (model or plain_cnn()).to(dtype)
    return dfs_kernels.multi_exit(model, EXITS, num_classes=NUM_CLASSES, flavour=flavour,
                                  backend=backend() if flavour == "dfs" else "auto",
                                  example_input=torch.randn(2, 3, 8, 8, dtype=dtype))


def batch(size: int = 4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(size, 3, 8, 8, generator=generator, dtype=dtype),
            torch.randint(0, NUM_CLASSES, (size,), generator=generator))


def per_exit_gradients(model, images, labels):
    parameters = list(model.parameters())
    logits, _ = model(images, return_features=True)
    result = []
    for term in [F.cross_entropy(z, labels) for z in logits]:
        grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
        result.append([torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)])
    return result


def strategy_gradients(strategy, model, images, labels):
    model.zero_grad(set_to_none=True)
    result = strategy.backward(model, images, labels)
    assert len(result.exit_losses) == len(EXITS) + 1
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


# --- strategies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["dfs", "dfs_eager"])
def test_dfs_strategy_trains_a_dfs_multi_exit_model_as_its_own_loss_would(flavour):
    model, (images, labels) = wrapped(flavour), batch()
    expected = [sum(grads) for grads in zip(*per_exit_gradients(model, images, labels))]
    for name, actual, wanted in zip([n for n, _ in model.named_parameters()],
                                    strategy_gradients(DeepFeatureSurgery(), model, images, labels), expected):
        assert_close(actual, wanted, name=name)


def test_dfs_strategy_refuses_a_dsn_multi_exit_model():
    with pytest.raises(ValueError, match="flavour='dfs' or 'dfs_eager'"):
        DeepFeatureSurgery().backward(wrapped("dsn"), *batch())


def test_dfs_and_dsn_multi_exit_models_train_differently():
    # the check above can fail: the DFS flavour's stop-gradients change the backbone's gradient
    images, labels = batch()
    dfs = strategy_gradients(DeepFeatureSurgery(), wrapped("dfs"), images, labels)
    dsn = strategy_gradients(JointTraining(), wrapped("dsn"), images, labels)
    assert not torch.allclose(dfs[0], dsn[0])


def test_byot_skips_the_feature_term_of_a_multi_exit_model():
    # MultiExitModel returns no distillation features: BYOT is its label and distillation terms
    model, (images, labels) = wrapped("dfs"), batch()
    with_features = strategy_gradients(DeepFeatureSurgery(SelfDistillationLoss(gamma=0.3)), model, images, labels)
    without = strategy_gradients(DeepFeatureSurgery(SelfDistillationLoss(gamma=0.3, feature_weight=0.0)), model,
                                 images, labels)
    plain = strategy_gradients(DeepFeatureSurgery(), model, images, labels)
    for a, b in zip(with_features, without):
        assert torch.equal(a, b)
    assert not torch.allclose(with_features[0], plain[0])


def test_bdl_refuses_a_multi_exit_model_saying_why():
    with pytest.raises(TypeError, match="cannot train a MultiExitModel.*one block at a time"):
        BlockDependentLosses(2).backward(wrapped("dsn"), *batch())


@pytest.mark.parametrize("flavour", ["dsn", "dfs"])
def test_gd_projects_the_per_exit_gradients_of_a_multi_exit_model(flavour):
    model, (images, labels) = wrapped(flavour), batch()
    grads = per_exit_gradients(model, images, labels)
    parameters = list(model.parameters())
    shared = [i for i in range(len(parameters)) if sum(bool(g[i].ne(0).any()) for g in grads) >= 2]
    assert shared, "the backbone's first convolution is reached by every exit"
    matrix = torch.stack([torch.cat([exit_grads[i].reshape(-1) for i in shared]) for exit_grads in grads])
    combined = project_conflicting(matrix, "fixed")
    expected = [sum(exit_grads[i] for exit_grads in grads) for i in range(len(parameters))]
    offset = 0
    for i in shared:
        expected[i] = combined[offset: offset + parameters[i].numel()].view_as(parameters[i])
        offset += parameters[i].numel()
    actual = strategy_gradients(GradientDeconfliction("fixed"), model, images, labels)
    for name, a, e in zip([n for n, _ in model.named_parameters()], actual, expected):
        assert_close(a, e, name=name)


# --- torch.compile and export ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["dfs", "dfs_eager"])
def test_compiled_fullgraph_equals_eager_outputs_and_gradients(flavour):
    torch._dynamo.reset()
    model, (images, labels) = wrapped(flavour), batch()
    compiled = torch.compile(model, fullgraph=True)

    def run(module):
        model.zero_grad(set_to_none=True)
        outputs = module(images)
        sum(F.cross_entropy(z, labels) for z in outputs).backward()
        return [z.detach() for z in outputs], [p.grad.clone() for p in model.parameters()]

    eager_outputs, eager_grads = run(model)
    compiled_outputs, compiled_grads = run(compiled)
    for k, (a, b) in enumerate(zip(compiled_outputs + compiled_grads, eager_outputs + eager_grads, strict=True)):
        assert_close(a, b, name=f"output or gradient {k}")


def test_export_gives_a_plain_network_with_the_heads():
    model = wrapped("dfs").eval()
    images, _ = batch()
    program = torch.export.export(model, (images,)).run_decompositions(dfs_kernels.export_decompositions())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "dfs_kernels" in t], targets
    assert model.partitioned[0] == ["2"]  # the export did lower a partitioned convolution
    for k, (a, b) in enumerate(zip(program.module()(images), model(images), strict=True)):
        assert_close(a, b, name=f"output {k}")


# --- inference ---------------------------------------------------------------------------------------


def test_flops_of_a_multi_exit_model_are_cumulative_per_exit():
    model, (images, _) = wrapped("dsn").eval(), batch(3)
    flops = inference.exit_flops(model, images)
    assert len(flops) == len(EXITS) + 1 and flops == sorted(flops) and flops[0] > 0
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert flops[-1] == counter.get_total_flops() // 3
    # exit 1: the first convolution (3 -> 8, 3x3, 8x8 pixels, 2 FLOPs per multiply-add) and head 1's linear
    assert flops[0] == 2 * 8 * 3 * 9 * 64 + 2 * 8 * NUM_CLASSES
    with pytest.raises(ValueError, match="flavour='dsn'"):
        inference.exit_flops(wrapped("dfs").eval(), images)


@pytest.mark.parametrize("thresholds", [[0.5, 0.5, 0.0], [-float("inf"), 1.0, 0.0], [2.0, 2.0, 0.0]],
                         ids=["mixed", "all_at_exit_1", "all_at_the_end"])
def test_early_exit_of_a_multi_exit_model_matches_the_simulated_evaluation(thresholds):
    model = wrapped("dsn").eval()
    images, labels = batch(16)
    torch.nn.init.normal_(model.heads[0].fc.weight, std=3.0)  # confident enough for some samples to leave
    outputs = inference.collect_exit_outputs(model, torch.utils.data.TensorDataset(images, labels), batch_size=5)
    ran = []
    handle = model.model[4].register_forward_hook(lambda *args: ran.append(True))  # after exit 2
    try:
        result = inference.early_exit_predict(model, images, thresholds)
    finally:
        handle.remove()
    expected = inference.assign_exits(outputs.confidences, torch.tensor(thresholds, dtype=torch.float64))
    assert torch.equal(result.exits, expected)
    assert torch.equal(result.predictions, outputs.predictions.gather(0, expected[None]).squeeze(0))
    assert bool(ran) == bool((expected == 2).any())  # the batch stopped where no sample was left


def test_collect_exit_outputs_reads_a_hugging_face_output():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=NUM_CLASSES)
    model = dfs_kernels.multi_exit(transformers.ResNetForImageClassification(config), ["resnet.encoder.stages.0"],
                                   num_classes=NUM_CLASSES, example_input=torch.randn(2, 3, 16, 16)).eval()
    images = torch.randn(6, 3, 16, 16)
    outputs = inference.collect_exit_outputs(model, torch.utils.data.TensorDataset(images, torch.zeros(6).long()))
    with torch.no_grad():
        final = model(images)[-1].logits
    assert outputs.confidences.shape == (2, 6)
    assert torch.equal(outputs.predictions[-1], final.argmax(1))
    with torch.no_grad():
        program = torch.export.export(model, (images,))
    exported = program.module()(images)[-1]
    assert_close(exported.logits, final, name="exported logits")  # a ModelOutput leaves export as a ModelOutput
