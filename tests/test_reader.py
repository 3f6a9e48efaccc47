"""Reading a model as it runs: what is read, what is refused and why, and that reading never
changes the model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nonsingular as ns
from nonsingular import InputError, Threat, UnsupportedLayerError
from nonsingular.errors import UnsupportedModelError
from nonsingular.model import check_batch, read_model
from nonsingular.model.graph import Param, Ref, compile_template, slots

from .conftest import assert_state_equal, state_copy


def zoo():
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d(4)
    bn2.running_mean.uniform_(-1, 1)
    bn2.running_var.uniform_(0.5, 2)
    bn1 = nn.BatchNorm1d(10, affine=False)
    bn1.running_mean.uniform_(-1, 1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        bn2,
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 4 * 4, 10)),
        bn1,
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(10, 3, bias=False),
    )


def test_network_computes_the_models_eval_function_without_touching_its_mode():
    model = zoo()
    model.train()  # our forward is the deployed (eval) function whatever the mode
    x = torch.rand(5, 1, 8, 8)
    graph = read_model(model, x)
    out = graph(x)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    torch.testing.assert_close(out, model(x))
    names = [node.op.weight_name for node in graph.affine_nodes]
    assert names == ["0.weight", "4.2.weight", "8.weight"]
    assert set(names) <= dict(model.named_parameters()).keys()


def test_per_example_forward_matches_separate_calls():
    model = zoo()
    x = torch.rand(3, 1, 8, 8)
    conv = read_model(model, x).affine_nodes[0].op
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    kernels = weight + 0.1 * torch.randn(3, *weight.shape)
    biases = bias + torch.randn(3, 4)
    batched = conv.forward_per_example(x, kernels, biases)
    for i in range(3):
        torch.testing.assert_close(
            batched[i : i + 1], conv.forward(x[i : i + 1], kernels[i], biases[i])
        )


def test_check_batch_errors_say_what_was_expected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 4)
    graph = read_model(model, x)
    assert check_batch(graph, model, x, torch.tensor([0, 2])).shape == (2, 3)
    with pytest.raises(InputError, match="does not fit the model"):
        check_batch(graph, model, torch.rand(2, 5))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\].*\[0, 3\]"):
        check_batch(graph, model, x, torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"y must have shape \(2,\)"):
        check_batch(graph, model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="integer tensor"):
        check_batch(graph, model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="floating-point"):
        check_batch(graph, model, torch.ones(2, 4, dtype=torch.long))


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def test_hooks_are_refused_with_the_reason():
    model, x = small(), torch.rand(2, 4)
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(
        UnsupportedModelError, match="module '1' has a forward hook.*remove the hook"
    ):
        read_model(model, x)
    handle.remove()
    handle = model.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(UnsupportedModelError, match="the model has a forward pre-hook"):
        read_model(model, x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(UnsupportedModelError, match="has a global forward hook"):
            ns.attack(model, x, torch.tensor([0, 1]), Threat(eps_x=0.1))
    finally:
        handle.remove()


def test_weight_norm_old_and_new_style_is_refused_with_the_way_out():
    model, x = small(), torch.rand(2, 4)
    torch.nn.utils.weight_norm(model[1])  # old style: a pre-hook recomputes the weight
    with pytest.raises(
        UnsupportedModelError, match="old-style torch.nn.utils.weight_norm.*remove_"
    ):
        ns.certify(model, x, torch.tensor([0, 1]), Threat())
    model = small()
    torch.nn.utils.parametrizations.weight_norm(model[3])
    with pytest.raises(
        UnsupportedModelError, match="'3'.*parametrizations.*remove_parametrizations"
    ):
        read_model(model, x)


def test_untraceable_forwards_and_odd_signatures_say_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class TwoInputs(Branchy):
        def forward(self, x, mask):
            return self.fc(x * mask)

    class Pair(Branchy):
        def forward(self, x):
            return self.fc(x), x

    x = torch.rand(2, 4)
    with pytest.raises(UnsupportedModelError, match="cannot be traced.*control flow"):
        read_model(Branchy(), x)
    with pytest.raises(UnsupportedModelError, match="one required input.*x, mask"):
        read_model(TwoInputs(), x)
    with pytest.raises(UnsupportedModelError, match="one tensor of logits"):
        read_model(Pair(), x)


def test_a_reading_that_disagrees_with_the_model_is_never_used():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x + 0.1 * torch.rand_like(x))

    model, x = Noisy(), torch.rand(6, 4)
    for run in (
        lambda: ns.attack(model, x, torch.zeros(6, dtype=torch.long), Threat(eps_x=0.1)),
        lambda: ns.certify(model, x, torch.zeros(6, dtype=torch.long), Threat(eps_x=0.1)),
    ):
        with pytest.raises(UnsupportedModelError, match="disagrees with model.*random numbers"):
            run()


def test_reading_attacking_and_certifying_never_change_the_model():
    class Recorder(nn.Module):
        """A forward that stores its features on self, with BatchNorm in training mode."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.bn = nn.BatchNorm1d(5)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            self.features = F.relu(self.bn(self.fc(x)))
            return self.out(self.features)

    model = Recorder().train()
    model.bn.eval()  # mixed modes must come back as they were
    before = state_copy(model)
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    rng = torch.get_rng_state()
    read_model(model, x)
    ns.attack(model, x, y, Threat(eps_x=0.05, eps_w=0.01), steps=3)
    ns.certify(model, x, y, Threat(eps_x=0.05, eps_w=0.01), "crown")
    assert_state_equal(model, before)
    assert model.training and model.fc.training and not model.bn.training
    assert not hasattr(model, "features")
    assert not any(name.startswith("_tensor_constant") for name in vars(model))
    assert torch.equal(torch.get_rng_state(), rng)


def test_x_outside_the_bounds_by_any_amount_is_refused():
    model = small()
    x = torch.rand(2, 4)
    x[0, 0] = 1.0 + 1e-7  # within the old tolerance: the model receives this input, not 1.0
    y = torch.tensor([0, 1])
    for run in (
        lambda: ns.attack(model, x, y, Threat(eps_x=0.1)),
        lambda: ns.certify(model, x, y, Threat(eps_x=0.1)),
    ):
        with pytest.raises(InputError, match="outside the threat's bounds"):
            run()
    assert ns.certify(model, x, y, Threat(eps_x=0.1, bounds=None)).lower.shape == (2, 3)


def test_operations_without_relaxations_are_attacked_but_not_certified():
    class Wavy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.soft = nn.Softmax(dim=1)

        def forward(self, x):
            return self.soft(self.fc(torch.sin(x)))

    model, x, y = Wavy().eval(), torch.rand(4, 4), torch.tensor([0, 1, 2, 0])
    res = ns.attack(model, x, y, Threat(eps_x=0.2, eps_w=0.05), steps=5)
    assert res.margins.shape == (4,)
    with pytest.raises(UnsupportedLayerError, match=r"torch.sin at 'sin'.*no interval bounds"):
        ns.certify(model, x, y, Threat(eps_x=0.1), "ibp")
    model.fc = nn.Identity()
    model.train()
    with pytest.raises(UnsupportedModelError, match="'soft' \\(Softmax\\).*training mode.*eval"):
        read_model(model, x)


def test_weights_computed_or_read_elsewhere_are_moved_as_copies_and_bounds_refuse_them():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight.T

    torch.manual_seed(0)
    x = torch.rand(2, 4)
    for model, name in ((Computed(), "w"), (Shared(), "fc.weight")):
        with torch.no_grad():
            y = model(x).argmax(1)  # both right: both attacked
        res = ns.attack(model, x, y, Threat(eps_w=0.05), steps=5)
        for i in range(len(x)):
            delta = res.weight_deltas(i)[name]
            assert float(delta.abs().max()) > 0  # moved, inside the ball
            assert float(delta.abs().max()) <= 0.05 * (1 + 1e-6)
            logits = res.replay(model, i)[0]
            margin = logits[y[i]] - logits.scatter(0, y[i : i + 1], float("-inf")).max()
            assert abs(float(margin) - float(res.margins[i])) < 1e-5
        with pytest.raises(UnsupportedLayerError, match=f"moves '{name}'"):
            ns.certify(model, x, y, Threat(eps_w=0.01))
    assert ns.attack(Computed(), x, y, Threat(eps_x=0.01)).margins.shape == (2,)


def test_a_float32_near_tie_is_never_certified():
    """Exact arithmetic says the true class wins by a hair; the model, in float32, says it
    loses: a certificate must follow the model."""
    gen = torch.Generator().manual_seed(0)
    n = 2000
    w = torch.randn(1, n, generator=gen)
    model = nn.Linear(n, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.cat([w, w + 1e-6 * torch.randn(1, n, generator=gen)]))
    weight = model.weight.detach().double()
    xs = torch.rand(300, n, generator=gen)
    exact = xs.double() @ (weight[0] - weight[1])
    flipped = None
    with torch.no_grad():
        for i in exact.argsort(descending=False).tolist():  # the nearest ties first
            logits = model(xs[i : i + 1])[0]
            if exact[i] > 0 and logits[0] < logits[1]:
                flipped = i
                break
    assert flipped is not None  # float32 rounding really does flip a margin here
    x, y = xs[flipped : flipped + 1], torch.tensor([0])
    cert = ns.certify(model, x, y, Threat())
    assert float(cert.clean_margins[0]) < 0 < float(exact[flipped])
    assert not bool(cert.certified[0]) and float(cert.worst[0]) <= float(cert.clean_margins[0])


def test_avg_pool_with_a_negative_divisor_is_bounded_soundly():
    from .test_certificates import check_sound

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2, divisor_override=-4),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).eval()
    x = torch.rand(3, 1, 6, 6)
    check_sound(model, x, torch.tensor([0, 1, 2]), Threat(eps_x=0.05, eps_w=0.02), ["ibp", "crown"])


def test_a_linear_layer_over_a_sequence_adds_its_bias_per_feature():
    torch.manual_seed(0)

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.fc.bias.data.mul_(10)  # a bias misplaced per position would show at once

        def forward(self, x):
            return self.fc(x).mean(dim=1)

    model, x = Pooled().eval(), torch.rand(5, 6, 3)
    y = model(x).argmin(1)  # every margin negative
    cert = ns.certify(model, x, y, Threat(), "crown")
    torch.testing.assert_close(cert.worst.float(), cert.clean_margins, atol=1e-3, rtol=0)


def test_slots_walk_every_container_in_order() -> None:
    """Refs and Params are found inside tuples, lists, dict values and slice ends, in order;
    a template without any is filled as it is."""
    template = (
        Ref(0),
        [Param("w"), {"k": Ref(2), "j": (slice(None, Ref(3), Param("s")),)}],
        torch.Size([2, 3]),
        {"dim": 1},
    )
    assert slots(template) == [Ref(0), Param("w"), Ref(2), Ref(3), Param("s")]
    assert slots((torch.Size([2]), {"a": 1}, slice(1, 2), "x")) == []
    filled = compile_template(template)([10, 11, 12, 13], {"w": "W", "s": "S"})
    assert filled == (10, ["W", {"k": 12, "j": (slice(None, 13, "S"),)}], (2, 3), {"dim": 1})
    assert isinstance(filled[2], torch.Size) and type(filled[1]) is list
