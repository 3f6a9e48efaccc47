"""Joint attacks (upper bounds on robust accuracy): PGD and APGD over the input and the weights
at once, the strong ensemble (APGD-CE, then targeted APGD-DLR), and the random-noise
baseline, on any model nonsingular can read."""

from .apgd import apgd
from .options import LOSSES, METHODS, SCHEDULES, AttackOptions
from .pgd import attack, attack_loss, default_step_size, pgd
from .result import AttackResult
from .space import JointSpace, State, check_domain, margins

__all__ = [
    "LOSSES",
    "METHODS",
    "SCHEDULES",
    "AttackOptions",
    "AttackResult",
    "JointSpace",
    "apgd",
    "State",
    "attack",
    "attack_loss",
    "check_domain",
    "default_step_size",
    "margins",
    "pgd",
]
