import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nonsingular.balls import BoxBall, L2Ball, make_ball

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def tensor(shape, seed, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@given(shape=shapes, seed=st.integers(0, 10_000), uniform=st.booleans())
def test_box_projection_sampling_and_steps_stay_inside(shape, seed, uniform):
    radius = torch.tensor(0.3) if uniform else tensor(shape, seed + 1).abs() + 0.01
    ball = BoxBall(radius)
    v = tensor(shape, seed)
    p = ball.project(v)
    assert ball.contains(p)
    assert torch.equal(ball.project(p), p)
    assert torch.all((p - v).abs() <= (v.abs() - radius).clamp_min(0) + 1e-6)  # nearest point
    g = torch.Generator().manual_seed(seed)
    assert ball.contains(ball.random(torch.empty(shape), g))
    stepped = ball.project(ball.step(p, tensor(shape, seed + 2), 0.5))
    assert ball.contains(stepped)


@given(shape=shapes, seed=st.integers(0, 10_000), batched=st.booleans())
def test_l2_projection_is_the_nearest_point_of_the_ball(shape, seed, batched):
    batch_dims = 1 if batched else 0
    radius = tensor(shape[:1], seed + 1).abs() + 0.1 if batched else 0.7
    ball = L2Ball(radius, batch_dims)
    v = tensor(shape, seed)
    p = ball.project(v)
    assert ball.contains(p)
    dims = tuple(range(batch_dims, v.dim()))
    norm_v = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
    r = torch.as_tensor(radius).reshape(
        torch.as_tensor(radius).shape + (1,) * (v.dim() - batch_dims)
    )
    expected = torch.where(norm_v > r, v * r / norm_v, v)
    torch.testing.assert_close(p, expected)
    g = torch.Generator().manual_seed(seed)
    assert ball.contains(ball.random(torch.empty(shape), g))
    assert ball.contains(ball.project(ball.step(p, tensor(shape, seed + 2), 0.5)))


def test_l2_samples_fill_the_ball_not_just_its_surface():
    ball = L2Ball(1.0, batch_dims=1)
    s = ball.random(torch.empty(20_000, 2), torch.Generator().manual_seed(0))
    inner = (s.norm(dim=1) < 0.5).float().mean()  # uniform in a disc: area fraction 1/4
    assert abs(float(inner) - 0.25) < 0.02


def test_box_samples_are_uniform_per_coordinate():
    s = BoxBall(2.0).random(torch.empty(50_000), torch.Generator().manual_seed(0))
    assert abs(float((s.abs() < 1.0).float().mean()) - 0.5) < 0.01
    assert float(s.abs().max()) <= 2.0


def test_steps_move_by_alpha_times_radius():
    box = make_ball("linf", torch.tensor([1.0, 2.0]))
    assert torch.equal(
        box.step(torch.zeros(2), torch.tensor([3.0, -1.0]), 0.5), torch.tensor([0.5, -1.0])
    )
    l2 = make_ball("l2", 2.0, batch_dims=1)
    out = l2.step(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8]]))


@pytest.mark.parametrize("ball", [BoxBall(0.5), L2Ball(0.5, 1)])
def test_contains_rejects_points_outside(ball):
    assert not ball.contains(torch.full((1, 4), 0.6))


@given(shape=shapes, seed=st.integers(0, 10_000), alpha=st.floats(0.01, 2.0))
def test_elementwise_box_ascent_is_the_projected_step(shape, seed, alpha):
    # the fused step of an elementwise radius (relative linf) gives exactly the numbers of
    # the two-part definition, project(step(...)), zero-radius coordinates included
    radius = tensor(shape, seed + 1).abs() * (tensor(shape, seed + 3) > 0)
    ball = BoxBall(radius)
    v = ball.project(tensor(shape, seed))
    grad = tensor(shape, seed + 2) * (tensor(shape, seed + 4) > -1)  # some exact zeros
    expected = ball.project(ball.step(v, grad, alpha))
    fused = ball.ascend(v, grad, alpha)
    assert torch.equal(fused, expected)
    assert ball.contains(fused)
    before = v.clone()
    scratch = grad.clone()
    assert torch.equal(ball.ascend(v, scratch, alpha, consume=True), expected)  # into scratch
    assert torch.equal(v, before)  # the iterate itself is never written into


@given(shape=shapes, seed=st.integers(0, 10_000), alpha=st.floats(0.01, 2.0))
def test_uniform_box_ascent_into_the_gradient_gives_the_same_numbers(shape, seed, alpha):
    ball = BoxBall(0.3)
    v = ball.project(tensor(shape, seed))
    grad = tensor(shape, seed + 2) * (tensor(shape, seed + 4) > -1)
    plain = ball.ascend(v, grad.clone(), alpha)
    torch.testing.assert_close(plain, ball.project(ball.step(v, grad, alpha)))
    assert torch.equal(ball.ascend(v, grad.clone(), alpha, consume=True), plain)
    expanded = torch.ones(shape).expand(2, *shape)  # not a scratch tensor: left alone
    ball.ascend(torch.zeros(2, *shape), expanded, alpha, consume=True)
    assert torch.equal(expanded, torch.ones(2, *shape))


def test_elementwise_box_ascent_keeps_a_radius_gradient():
    # training's relative radius carries its parameter's gradient through the step
    weight = torch.tensor([0.5, -2.0], requires_grad=True)
    ball = BoxBall(0.1 * weight.abs())
    out = ball.ascend(torch.zeros(2), torch.tensor([1.0, 1.0]), 10.0)  # clipped at the radius
    (grad,) = torch.autograd.grad(out.sum(), weight)
    torch.testing.assert_close(grad, torch.tensor([0.1, -0.1]))
