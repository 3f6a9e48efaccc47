"""The training objectives. Each method turns a batch into ``(loss, logits)``; the loop owns
everything else (data order, optimizer, checkpoints), so a method is a few lines.

The model is read once (its graph, with the live parameters, checked against ``model(x)``).
Adversarial methods find their perturbation on a detached copy of that reading, in eval mode
(the attack never builds a graph through the weights, nor moves BatchNorm statistics), then
evaluate the loss at that perturbation on the live reading in training mode (batch
statistics, Dropout), whose parameters get the gradient. A module nonsingular runs as it is
(an LSTM, a TransformerEncoder: ``ModuleCall``) computes in the mode its module is in, so the
reading and the attacks run with the model held in eval mode (``deployed``), and the loss
with it in training mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import JointSpace, default_step_size, pgd
from ..certificates import closed_form_terms, recursive_terms
from ..certificates.closed_form import dense_layers
from ..certificates.ibp import ibp_margins, interval_bounds
from ..certificates.region import InputRegion
from ..certificates.support import check_bounded
from ..model import Graph, check_batch, perturbed_layers, read_model
from ..model.weights import choose_weights
from ..threat import Threat

if TYPE_CHECKING:  # the config reads the registry, which imports these classes
    from .config import TrainConfig


@dataclass
class Batch:
    """Where a batch comes from: ``positions``, its examples' places in the training set, and
    the epoch's ``seed`` (together they seed every random draw example by example, so a
    result never depends on how a batch was split across processes); ``reduce`` sums a
    gradient shared by the whole batch over the processes that hold parts of it."""

    positions: Tensor
    seed: int
    reduce: Callable[[Tensor], Tensor] | None = None


@contextlib.contextmanager
def deployed(model: nn.Module) -> Iterator[None]:
    """``model`` (the training copy) in eval mode inside, every module's own mode restored
    after: what a module run as it is computes while the reading is checked and attacked."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Method:
    """``loss(model, x, y, progress, batch)``; ``progress`` in [0, 1] is how far training is.

    Robust methods ramp their budget up linearly over the first ``ramp`` of training (a large
    budget from a random initialization can stall training at chance level).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config.resolved()
        self.threat = self.config.resolved_threat()
        self._read: tuple[nn.Module, Graph] | None = None

    def graph(self, model: nn.Module, x: Tensor) -> Graph:
        """The live reading of ``model`` (made, and checked against ``model(x)``, once)."""
        if self._read is None or self._read[0] is not model:
            with deployed(model):
                graph = read_model(model, x, detach=False)
                check_batch(graph, model, x)
            self._read = (model, graph)
        return self._read[1]

    def prepare(self, model: nn.Module, x: Tensor) -> None:
        """Check, before training starts (and before anything is written), that this method
        can train ``model`` on batches like ``x``: read it, and try the loss's parts."""
        graph = self.graph(model, x)
        choose_weights(graph, self.threat)  # the threat fits the model (and moves something)

    def scale(self, progress: float) -> float:
        """The fraction of the full budget in use at ``progress``."""
        ramp = self.config.ramp
        return 1.0 if ramp == 0 else min(1.0, progress / ramp)

    def budget(self, progress: float) -> Threat:
        s = self.scale(progress)
        return self.threat.replace(eps_x=self.threat.eps_x * s, eps_w=self.threat.eps_w * s)

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Standard(Method):
    """Cross-entropy on clean data."""

    def prepare(self, model: nn.Module, x: Tensor) -> None:
        return None  # runs the model itself: any module trains

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits


def _attack_state(
    threat: Threat,
    graph: Graph,
    x: Tensor,
    y: Tensor,
    steps: int,
    step_size: float | None,
    batch: Batch,
    random_start: bool = True,
) -> tuple[dict[str, Tensor], JointSpace]:
    """The final PGD iterate under ``threat`` on the detached reading ``graph``, and the space
    it lives in (no best-so-far tracking: training wants speed)."""
    space = JointSpace(graph, threat, x)
    if not space.balls or steps == 0:
        return space.zeros(x), space
    alpha = step_size if step_size is not None else default_step_size(steps)
    state, _ = pgd(
        space,
        x,
        y,
        steps=steps,
        alpha=alpha,
        random_start=random_start,
        seed=batch.seed,
        positions=batch.positions,
        reduce=batch.reduce,
    )
    return state, space


class Adversarial(Method):
    """Cross-entropy at the worst case PGD finds: ``pgd-at`` (input only, Madry et al.) and
    ``joint-at`` (input and per-example weights through the lemma); pgd-at's config holds
    ``eps_w = 0`` (its registry entry forces it)."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        live = self.graph(model, x)
        with deployed(model):
            state, space = _attack_state(
                threat, live.detached(), x, y, c.attack_steps, c.attack_step_size, batch
            )
        logits = space.forward(x, state, graph=live, training=True)
        return F.cross_entropy(logits, y), logits


class WeightAdversarial(Adversarial):
    """``weight-at``: cross-entropy at the worst per-example l_inf absolute weight perturbation
    PGD finds (the paper's weight threat, through the lemma), the input left clean; its
    registry entry forces that threat."""


class AWP(Method):
    """Adversarial weight perturbation (Wu et al. 2020): input PGD when ``eps_x > 0``, then one
    normalized gradient step on the weights to the edge of the (default: relative l2, shared)
    weight ball; the gradient is taken there and applies to the unperturbed weights."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        live = self.graph(model, x)
        detached = live.detached()
        with deployed(model):
            inputs, _ = _attack_state(
                threat.replace(eps_w=0.0), detached, x, y, c.attack_steps, c.attack_step_size, batch
            )
            x_adv = JointSpace.inputs(x, inputs)
            weights_only = threat.replace(eps_x=0.0)
            delta, space = _attack_state(
                weights_only, detached, x_adv, y, 1, 1.0, batch, random_start=False
            )
        logits = space.forward(x_adv, delta, graph=live, training=True)
        return F.cross_entropy(logits, y), logits


class BoundRegularized(Method):
    """The paper's proposal: cross-entropy plus ``lambda_x`` times the bound's input term and
    ``lambda_w`` times its weight term (worst wrong class per example, mean over the batch).

    B0 (``bound="closed-form"``) needs only the weights and ``||x||_inf``, beside the usual
    forward pass; B1 (``bound="recursive"``) follows the activations, so its own pass gives
    the logits. The product of layer norms could overflow for a diverging deep network: the
    training loop stops on a non-finite loss with an error rather than a NaN model.
    """

    def prepare(self, model: nn.Module, x: Tensor) -> None:
        super().prepare(model, x)
        dense_layers(self.graph(model, x), x, f"bound-reg ({self.config.bound})")

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        live = self.graph(model, x)
        if c.bound == "closed-form":
            logits = model(x)
            terms = closed_form_terms(live, x, y, threat, logits=logits)
        else:
            terms = recursive_terms(live, x, y, threat)
            logits = terms.logits
        input_term, weight_term = terms.worst()  # the worst wrong class per example
        reg = c.lambda_x * input_term.mean() + c.lambda_w * weight_term.mean()
        return F.cross_entropy(logits, y) + reg, logits


class IntervalBound(Method):
    """Certified training (Gowal et al. 2019) with the joint IBP bound: while the budget ramps
    up, the weight of the clean loss goes from 1 to ``kappa``; the robust loss is the
    cross-entropy of the worst-case margins."""

    def prepare(self, model: nn.Module, x: Tensor) -> None:
        """Also bound one example at the full budget: a layer without interval bounds (an
        einsum, an LSTM run as it is) is an UnsupportedLayerError naming it, before training."""
        super().prepare(model, x)
        graph = self.graph(model, x).detached()
        check_bounded(graph)
        budgets = {b.index: b for b in perturbed_layers(graph, self.threat)}
        with torch.no_grad(), deployed(model):
            interval_bounds(graph, budgets, InputRegion.from_threat(x[:1], self.threat), unit=0.0)

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        threat = self.budget(progress)
        live = self.graph(model, x)
        logits = model(x)  # training mode: BatchNorm's running statistics follow the data
        budgets = {b.index: b for b in perturbed_layers(live, threat)}
        region = InputRegion.from_threat(x, threat)
        bounds = interval_bounds(live, budgets, region, unit=0.0)  # exact arithmetic
        lower = ibp_margins(live, budgets, region, y, logits.shape[1], bounds)
        kappa = 1.0 - (1.0 - self.config.kappa) * self.scale(progress)
        robust = F.cross_entropy(-lower, y)  # worst-case logits z_j - z_y >= -lower_j
        return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust, logits
