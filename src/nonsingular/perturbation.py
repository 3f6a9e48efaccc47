"""A joint perturbation of one batch: the input delta and every layer's weight variables.

``JointSpace`` knows, for a network and a threat, which variables exist, which ball each one
lives in, how to run the network under a point of the space, and how to turn a point into
the parameter-space perturbation of one example (materialization). Attacks and adversarial
training walk its variables; nothing here branches on the weight mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .balls import Ball, make_ball
from .errors import InputError
from .network import Network
from .threat import Threat
from .weights import WeightVariables, weight_variables

State = dict[str, Tensor]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per example: positive iff the prediction is ``y``."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def check_domain(x: Tensor, threat: Threat) -> None:
    """Raise when ``x`` lies outside the threat's input bounds (clamping would move it)."""
    if threat.bounds is None or x.numel() == 0:
        return
    lo, hi = threat.bounds
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - 1e-6 or xmax > hi + 1e-6:
        raise InputError(
            f"x has values in [{xmin:.4g}, {xmax:.4g}], outside the threat's bounds "
            f"({lo:g}, {hi:g}); pass Threat(bounds=...) matching your data, or bounds=None"
        )


class JointSpace:
    """The variables of a joint perturbation of ``net`` under ``threat``.

    Variable ``"x"`` is the input delta ``(B, *x.shape[1:])``; weight variables are named
    ``"{layer index}.{name}"``. ``weights`` overrides the per-layer parametrization (the
    noise baseline uses shared parameter-space draws in every scope).
    """

    def __init__(
        self, net: Network, threat: Threat, weights: dict[int, WeightVariables] | None = None
    ) -> None:
        self.net = net
        self.threat = threat
        self.layers = weight_variables(net, threat) if weights is None else weights
        self.balls: dict[str, Ball] = {}
        self.batched: dict[str, bool] = {}
        if threat.eps_x > 0:
            self.balls["x"] = make_ball(threat.x_norm, threat.eps_x, batch_dims=1)
            self.batched["x"] = True
        for k, wv in self.layers.items():
            for name, ball in wv.balls.items():
                self.balls[f"{k}.{name}"] = ball
                self.batched[f"{k}.{name}"] = wv.batched

    @property
    def shared(self) -> bool:
        """True when some variable is shared by the whole batch (one Delta for all)."""
        return not all(self.batched.values())

    def _shapes(self, x: Tensor) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if "x" in self.balls:
            shapes["x"] = tuple(x.shape)
        for k, wv in self.layers.items():
            for name, shape in wv.shapes(x.shape[0]).items():
                shapes[f"{k}.{name}"] = shape
        return shapes

    def zeros(self, x: Tensor) -> State:
        """The unperturbed point."""
        return {key: x.new_zeros(shape) for key, shape in self._shapes(x).items()}

    def random(self, x: Tensor, generator: torch.Generator | None = None) -> State:
        """A point drawn uniformly from every ball (input then clamped into the domain)."""
        state = {
            key: self.balls[key].random(x.new_empty(shape), generator)
            for key, shape in self._shapes(x).items()
        }
        return self.clamp_input(x, state)

    def clamp_input(self, x: Tensor, state: State) -> State:
        """Keep ``x + d`` inside the threat's bounds (shrinks ``d``, so it stays in its ball)."""
        if "x" in state and self.threat.bounds is not None:
            lo, hi = self.threat.bounds
            state["x"] = (x + state["x"]).clamp(lo, hi) - x
        return state

    def step(self, x: Tensor, state: State, grads: State, alpha: float) -> State:
        """One projected ascent step of every variable."""
        new = {key: self.balls[key].ascend(v, grads[key], alpha) for key, v in state.items()}
        return self.clamp_input(x, new)

    def _layer_state(self, state: State, k: int) -> State:
        return {name: state[f"{k}.{name}"] for name in self.layers[k].balls}

    def forward(
        self, x: Tensor, state: State, record: Callable[[int, Tensor], None] | None = None
    ) -> Tensor:
        """Logits of the network at ``x + state["x"]`` with the weight perturbation applied."""
        overrides = {}
        for k, wv in self.layers.items():

            def run(h: Tensor, k: int = k, wv: WeightVariables = wv) -> Tensor:
                if record is not None:
                    record(k, h)
                return wv.apply(h, self._layer_state(state, k))

            overrides[k] = run
        x_in = x + state["x"] if "x" in state else x
        return self.net.forward(x_in, overrides)

    def select(self, state: State, index: Tensor) -> State:
        """The rows ``index`` of every per-example variable (shared ones unchanged)."""
        return {key: v[index] if self.batched[key] else v for key, v in state.items()}

    def materialize(self, x_adv: Tensor, state: State) -> dict[str, Tensor]:
        """``{parameter name: Delta}`` for one example: ``x_adv (1, ...)``, ``state`` of that row.

        Rebuilt layer by layer from the perturbed activations, so running the unmodified
        model on ``x_adv`` with these deltas reproduces the logits of ``forward``.
        """
        inputs: dict[int, Tensor] = {}
        zero_x = {key: v for key, v in state.items() if key != "x"}
        with torch.no_grad():
            self.forward(x_adv, zero_x, record=lambda k, h: inputs.__setitem__(k, h))
            deltas: dict[str, Tensor] = {}
            for k, wv in self.layers.items():
                v = self._layer_state(state, k)
                if wv.batched:
                    v = {name: t[0] for name, t in v.items()}
                deltas.update(wv.materialize(inputs[k][0], v))
        return deltas
