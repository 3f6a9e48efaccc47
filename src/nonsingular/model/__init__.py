"""Reading a model as it runs: its graph of operators, the lemma's weight budgets, and the
check of every reading against ``model(x)``."""

from .graph import Graph, Node
from .lemma import LayerBudget, OutputSet, perturbed_layers
from .reader import eval_mode, preserved, read_model
from .verify import (
    check_batch,
    check_clean_logits,
    model_dtype,
    move_batch,
    read_batch,
    with_gradients,
)

__all__ = [
    "Graph",
    "LayerBudget",
    "Node",
    "OutputSet",
    "check_batch",
    "check_clean_logits",
    "eval_mode",
    "model_dtype",
    "move_batch",
    "perturbed_layers",
    "preserved",
    "read_batch",
    "read_model",
    "with_gradients",
]
