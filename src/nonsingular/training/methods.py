"""The training objectives. Each method turns a batch into ``(loss, logits)``; the loop owns
everything else (data order, optimizer, checkpoints), so a method is a few lines.

Adversarial methods find their perturbation on a detached copy of the network (the attack
never builds a graph through the weights), then evaluate the loss at that perturbation on the
live network, whose parameters get the gradient. The model is only ever run functionally
here, with its deployed (eval-mode) layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import default_step_size, pgd
from ..certificates import closed_form_terms, recursive_terms
from ..certificates.ibp import ibp_margins
from ..certificates.region import InputRegion
from ..network import Network
from ..perturbation import JointSpace
from ..threat import Threat
from ..weights import perturbed_layers
from .config import TrainConfig


class Method:
    """``loss(model, x, y, progress, generator)``; ``progress`` in [0, 1] is how far training is.

    Robust methods ramp their budget up linearly over the first ``ramp`` of training (a large
    budget from a random initialization can stall training at chance level).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config.resolved()
        self.threat = self.config.resolved_threat()

    def scale(self, progress: float) -> float:
        """The fraction of the full budget in use at ``progress``."""
        ramp = self.config.ramp
        return 1.0 if ramp == 0 else min(1.0, progress / ramp)

    def budget(self, progress: float) -> Threat:
        s = self.scale(progress)
        return self.threat.replace(eps_x=self.threat.eps_x * s, eps_w=self.threat.eps_w * s)

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Standard(Method):
    """Cross-entropy on clean data."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits


def _attack_state(
    threat: Threat,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    step_size: float | None,
    generator: torch.Generator,
    random_start: bool = True,
) -> dict[str, Tensor]:
    """The final PGD iterate under ``threat`` (no best-so-far tracking: training wants speed)."""
    space = JointSpace(Network.from_module(model), threat)
    if not space.balls or steps == 0:
        return space.zeros(x)
    alpha = step_size if step_size is not None else default_step_size(steps)
    state, _ = pgd(
        space, x, y, steps=steps, alpha=alpha, random_start=random_start, generator=generator
    )
    return state


class Adversarial(Method):
    """Cross-entropy at the worst case PGD finds: ``pgd-at`` (input only, Madry et al.) and
    ``joint-at`` (input and per-example weights through the lemma)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.method == "pgd-at":
            self.threat = self.threat.replace(eps_w=0.0)

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        state = _attack_state(threat, model, x, y, c.attack_steps, c.attack_step_size, generator)
        live = JointSpace(Network.from_module(model, detach=False), threat)
        logits = live.forward(x, state)
        return F.cross_entropy(logits, y), logits


class AWP(Method):
    """Adversarial weight perturbation (Wu et al. 2020): input PGD when ``eps_x > 0``, then one
    normalized gradient step on the weights to the edge of the (default: relative l2, shared)
    weight ball; the gradient is taken there and applies to the unperturbed weights."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        inputs = _attack_state(
            threat.replace(eps_w=0.0), model, x, y, c.attack_steps, c.attack_step_size, generator
        )
        x_adv = x + inputs["x"] if "x" in inputs else x
        weights_only = threat.replace(eps_x=0.0)
        delta = _attack_state(weights_only, model, x_adv, y, 1, 1.0, generator, random_start=False)
        live = JointSpace(Network.from_module(model, detach=False), weights_only)
        logits = live.forward(x_adv, delta)
        return F.cross_entropy(logits, y), logits


class BoundRegularized(Method):
    """The paper's proposal: cross-entropy plus ``lambda_x`` times the bound's input term and
    ``lambda_w`` times its weight term (worst wrong class per example, mean over the batch).

    B0 (``bound="closed-form"``) needs only the weights and ``||x||_inf``, beside the usual
    forward pass; B1 (``bound="recursive"``) follows the activations, so its own pass gives
    the logits. The product of layer norms could overflow for a diverging deep network: the
    training loop stops on a non-finite loss with an error rather than a NaN model.
    """

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        c, threat = self.config, self.budget(progress)
        net = Network.from_module(model, detach=False)
        if c.bound == "closed-form":
            logits = net.forward(x)
            terms = closed_form_terms(net, x, y, threat, logits=logits)
        else:
            terms = recursive_terms(net, x, y, threat)
            logits = terms.logits
        input_term, weight_term = terms.worst()  # the worst wrong class per example
        reg = c.lambda_x * input_term.mean() + c.lambda_w * weight_term.mean()
        return F.cross_entropy(logits, y) + reg, logits


class IntervalBound(Method):
    """Certified training (Gowal et al. 2019) with the joint IBP bound: while the budget ramps
    up, the weight of the clean loss goes from 1 to ``kappa``; the robust loss is the
    cross-entropy of the worst-case margins."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        threat = self.budget(progress)
        net = Network.from_module(model, detach=False)
        logits = net.forward(x)
        lower = ibp_margins(
            net,
            dict(perturbed_layers(net, threat)),
            InputRegion.from_threat(x, threat),
            y,
            logits.shape[1],
        )
        kappa = 1.0 - (1.0 - self.config.kappa) * self.scale(progress)
        robust = F.cross_entropy(-lower, y)  # worst-case logits z_j - z_y >= -lower_j
        return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust, logits


def make_method(config: TrainConfig) -> Method:
    kinds: dict[str, type[Method]] = {
        "standard": Standard,
        "pgd-at": Adversarial,
        "joint-at": Adversarial,
        "awp": AWP,
        "bound-reg": BoundRegularized,
        "ibp": IntervalBound,
    }
    return kinds[config.method](config)
