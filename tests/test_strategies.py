"""Training strategies: each one's gradients against a direct per-exit computation on tiny networks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dfs_kernels.models import msdnet, resnet18, vgg7_64
from dfs_kernels.training import (
    BlockDependentLosses,
    DeepFeatureSurgery,
    GradientDeconfliction,
    JointTraining,
    SelfDistillationLoss,
    build_strategy,
    project_conflicting,
    window_starts,
)

NUM_CLASSES = 5


def tiny_vgg(flavour: str = "dsn"):
    return vgg7_64(NUM_CLASSES, flavour=flavour).double()


def batch(size: int = 4, resolution: int = 8):
    images = torch.randn(size, 3, resolution, resolution, dtype=torch.float64)
    return images, torch.randint(0, NUM_CLASSES, (size,))


def per_exit_gradients(model, images, labels, loss=None):
    """Each exit's own loss gradient on every parameter, by a plain backward per exit (zeros where unreached)."""
    parameters = list(model.parameters())
    logits, features = model(images, return_features=True)
    terms = (loss or (lambda z, h, y: [F.cross_entropy(e, y) for e in z]))(logits, features, labels)
    result = []
    for term in terms:
        grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
        result.append([torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)])
    return result


def strategy_gradients(strategy, model, images, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    strategy.backward(model, images, labels, **kwargs)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_all_close(actual, expected, names):
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


# --- joint strategies -------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["dsn", "dfs_eager", "dfs"])
def test_joint_gradient_is_sum_of_exit_gradients(flavour):
    model, (images, labels) = tiny_vgg(flavour), batch()
    strategy = DeepFeatureSurgery() if flavour != "dsn" else JointTraining()
    expected = [sum(grads) for grads in zip(*per_exit_gradients(model, images, labels))]
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(strategy, model, images, labels), expected, names)


def test_dfs_strategy_refuses_a_dsn_model():
    with pytest.raises(ValueError, match="flavour"):
        build_strategy("dfs").backward(tiny_vgg("dsn"), *batch())


def test_self_distillation_terms_follow_the_formula():
    torch.manual_seed(1)
    logits = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    features = [torch.randn(3, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([0, 3, 1])
    gamma, temperature, weight = 0.3, 2.0, 0.5
    terms = SelfDistillationLoss(gamma, temperature, weight)(logits, features, labels)

    teacher = torch.softmax(logits[-1] / temperature, dim=1)
    for i in range(2):
        kd = -(teacher * torch.log_softmax(logits[i] / temperature, dim=1)).sum(1).mean()
        feature_term = ((features[i] - features[-1]) ** 2).sum().sqrt()
        expected = (1 - gamma) * F.cross_entropy(logits[i], labels) + gamma * kd + weight * feature_term
        torch.testing.assert_close(terms[i], expected)
    torch.testing.assert_close(terms[-1], F.cross_entropy(logits[-1], labels))
    # the teacher is a stop-gradient: early terms send nothing to the final exit's logits or feature
    assert torch.autograd.grad(terms[0] + terms[1], [logits[-1], features[-1]], allow_unused=True) == (None, None)


@pytest.mark.parametrize("flavour", ["dsn", "dfs"])
def test_byot_on_resnet_matches_per_exit_gradients(flavour):
    model = resnet18(NUM_CLASSES, flavour=flavour).double()
    images, labels = batch(2, 32)
    loss = SelfDistillationLoss(gamma=0.3)
    expected = [sum(grads) for grads in zip(*per_exit_gradients(model, images, labels, loss))]
    strategy = DeepFeatureSurgery(loss) if flavour == "dfs" else build_strategy("byot", gamma=0.3)
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(strategy, model, images, labels), expected, names)


# --- block-dependent losses -------------------------------------------------------------------------


def test_window_starts():
    assert window_starts(5, 1, (), False) == [0, 1, 2, 3, 4]
    assert window_starts(5, 3, (), False) == [0, 0, 0, 1, 2]
    assert window_starts(5, 3, (), True) == [0, 0, 0, 1, 0]
    assert window_starts(7, None, (3,), False) == [0, 0, 0, 3, 3, 3, 3]
    assert window_starts(7, 2, (3,), True) == [0, 0, 1, 3, 3, 4, 0]


def owners(model, block_modules, head_modules):
    """Per parameter: ("block", b) or ("head", k)."""
    owner = {}
    for kind, modules in (("block", block_modules), ("head", head_modules)):
        for index, module in enumerate(modules):
            for parameter in module.parameters():
                owner[id(parameter)] = (kind, index)
    return [owner[id(p)] for p in model.parameters()]


def windowed_sum(model, images, labels, starts, parameter_owners, loss=None):
    """Block b's parameters summed over the exits k with starts[k] <= b <= k; head k's from exit k only."""
    grads = per_exit_gradients(model, images, labels, loss)
    expected = []
    for position, (kind, index) in enumerate(parameter_owners):
        if kind == "head":
            expected.append(grads[index][position])
        else:
            allowed = [k for k in range(len(starts)) if starts[k] <= index <= k]
            expected.append(sum(grads[k][position] for k in allowed))
    return expected


@pytest.mark.parametrize("flavour", ["dsn", "dfs_eager", "dfs"])
@pytest.mark.parametrize("options", [
    dict(window=1),
    dict(window=2),
    dict(window=3, include_final=True),
    dict(window=None, group_boundaries=(2,)),
    dict(window=2, group_boundaries=(3,), include_final=True),
])
def test_bdl_block_gets_gradient_only_from_exits_in_its_window(flavour, options):
    model, (images, labels) = tiny_vgg(flavour), batch()
    strategy = BlockDependentLosses(**options)
    parameter_owners = owners(model, model.layers, model.exits)
    expected = windowed_sum(model, images, labels, strategy.starts(len(model.exits)), parameter_owners)
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(strategy, model, images, labels), expected, names)


@pytest.mark.parametrize("flavour", ["dsn", "dfs"])
def test_bdl_on_msdnet_matches_windowed_sum(flavour):
    model = msdnet(num_classes=NUM_CLASSES, growth_rate=2, flavour=flavour).double()
    images, labels = batch(2, 32)
    strategy = BlockDependentLosses(3, include_final=True)
    parameter_owners = owners(model, model.blocks, model.classifier)
    torch.manual_seed(2)  # the classifiers' dropout: the same masks in both forwards
    expected = windowed_sum(model, images, labels, strategy.starts(len(model.blocks)), parameter_owners)
    names = [name for name, _ in model.named_parameters()]
    torch.manual_seed(2)
    assert_all_close(strategy_gradients(strategy, model, images, labels), expected, names)


@pytest.mark.parametrize("flavour", ["dsn", "dfs"])
def test_bdl_on_resnet_with_feature_distillation_matches_windowed_sum(flavour):
    # Exit k sits after stage k (the stem belongs to block 1); every distillation term, the feature
    # term included, stays inside its exit's window because its teacher is detached.
    model = resnet18(NUM_CLASSES, flavour=flavour).double()
    images, labels = batch(2, 32)
    loss = SelfDistillationLoss(gamma=0.3, feature_weight=0.5)
    strategy = BlockDependentLosses(2, loss=loss)
    blocks = [torch.nn.ModuleList([model.conv1, model.bn1, model.stages[0]]), *model.stages[1:]]
    parameter_owners = owners(model, blocks, model.exits)
    expected = windowed_sum(model, images, labels, strategy.starts(len(model.exits)), parameter_owners, loss)
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(strategy, model, images, labels), expected, names)


def test_bdl_keeps_forward_values():
    model, (images, labels) = tiny_vgg("dfs"), batch()
    result = BlockDependentLosses(2).backward(model, images, labels)
    for got, expected in zip(result.logits, model(images)):
        torch.testing.assert_close(got, expected)


def test_bdl_rejects_unsupported_models_and_bad_boundaries():
    with pytest.raises(TypeError, match="MultiExitVGG"):
        BlockDependentLosses(2).backward(torch.nn.Sequential(torch.nn.Flatten()), *batch())
    with pytest.raises(ValueError, match="group boundaries"):
        BlockDependentLosses(2, group_boundaries=(6,)).backward(tiny_vgg(), *batch())


# --- gradient deconfliction -------------------------------------------------------------------------


def test_projection_of_two_conflicting_gradients():
    # g1.g2 = -1: g1 -> g1 + g2/2 = (0.5, 0.5); g2 -> g2 + g1 = (0, 1)
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(project_conflicting(gradients, "fixed"), expected)
    torch.testing.assert_close(project_conflicting(gradients, "random", torch.Generator().manual_seed(3)), expected)


def test_non_conflicting_gradients_are_summed_unchanged():
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(project_conflicting(gradients, "fixed"), gradients.sum(0))


def test_projection_of_three_gradients_in_fixed_order():
    # exit 1: (1,0) -[g2]-> (0.5,0.5) -[g3]-> (0.5,0); exit 2: (-1,1) -[g1]-> (0,1) -[g3]-> (0,0);
    # exit 3: (0,-1) -[g1: no conflict]-> (0,-1) -[g2]-> (-0.5,-0.5)
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(project_conflicting(gradients, "fixed"),
                               torch.tensor([0.0, -0.5], dtype=torch.float64))


def test_random_order_is_reproducible_from_the_seed():
    gradients = torch.randn(4, 10, dtype=torch.float64)
    first = project_conflicting(gradients, "random", torch.Generator().manual_seed(5))
    again = project_conflicting(gradients, "random", torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again)


@pytest.mark.parametrize("flavour", ["dsn", "dfs"])
def test_gd_projects_shared_and_keeps_private_gradients(flavour):
    model, (images, labels) = tiny_vgg(flavour), batch()
    grads = per_exit_gradients(model, images, labels)
    parameters = list(model.parameters())
    # VGG: layer b is reached by exits b..L, so every layer but the last is shared; heads are private.
    last_layer_and_heads = {id(p) for p in model.layers[-1].parameters()} | {id(p) for p in model.exits.parameters()}
    shared = [i for i, p in enumerate(parameters) if id(p) not in last_layer_and_heads]
    matrix = torch.stack([torch.cat([exit_grads[i].reshape(-1) for i in shared]) for exit_grads in grads])
    combined = project_conflicting(matrix, "fixed")
    assert (matrix @ matrix.T < 0).any(), "the test needs at least one conflict"
    expected = [sum(exit_grads[i] for exit_grads in grads) for i in range(len(parameters))]
    offset = 0
    for i in shared:
        expected[i] = combined[offset: offset + parameters[i].numel()].view_as(parameters[i])
        offset += parameters[i].numel()
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(GradientDeconfliction("fixed"), model, images, labels), expected, names)


# --- AMP scaling and DDP ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [BlockDependentLosses(2), GradientDeconfliction("fixed"), JointTraining()],
                         ids=["bdl", "gd", "dsn"])
def test_grad_scaler_scales_and_unscales_exactly(strategy):
    model, (images, labels) = tiny_vgg(), batch()
    plain = strategy_gradients(strategy, model, images, labels)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaled_grads = strategy_gradients(strategy, model, images, labels, scaler=scaler)
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(scaled_grads, [256.0 * g for g in plain], names)
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    assert_all_close([p.grad for p in model.parameters()], plain, names)


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", [BlockDependentLosses(2), GradientDeconfliction("fixed")], ids=["bdl", "gd"])
def test_ddp_wrapped_model_gets_the_same_gradients(strategy, single_rank_group):
    model, (images, labels) = tiny_vgg(), batch()
    plain = strategy_gradients(strategy, model, images, labels)
    wrapped = DistributedDataParallel(model)
    names = [name for name, _ in model.named_parameters()]
    assert_all_close(strategy_gradients(strategy, wrapped, images, labels), plain, names)
