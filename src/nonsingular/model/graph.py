"""A model read as the graph it really computes: nodes in topological order, each an operator
applied to the values of earlier nodes and to the model's tensors.

Attacks and certificates run this graph with the model's tensors (or perturbed copies built on
the fly), never the user's module, so the model itself is never touched (reading calls the module
once, to check the graph against ``model(x)``). Training does call its module, a copy of the
user's: its clean passes run it, and its optimizer updates the copy's parameters.
A reused module is two nodes; a residual add is a node with two inputs; a tied parameter is one
tensor that several nodes read. Every node computes the deployed (eval-mode) function unless a
training-mode run is asked for (``run(..., training=True)``: BatchNorm's batch statistics,
Dropout).

Node kinds: the ``input``; ``variable`` nodes (tensors that depend on the input: what bounds
are about); ``constant`` nodes (do not depend on the input); ``shape`` nodes (non-tensor values
computed from the input's shape, like ``x.size(0)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import map_aggregate

from .operators.affine import Affine
from .operators.base import Operator

INPUT, VARIABLE, CONSTANT, SHAPE = "input", "variable", "constant", "shape"


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of node ``index``."""

    index: int


@dataclass(frozen=True)
class Param:
    """An argument that is the model's tensor ``name`` (parameter, buffer or traced constant)."""

    name: str


Filler = Callable[[list[Any], Mapping[str, Tensor]], Any]


def compile_template(template: Any) -> Filler:
    """A function ``(values, tensors) -> template`` with every Ref and Param replaced."""
    if isinstance(template, Ref):
        index = template.index
        return lambda values, tensors: values[index]
    if isinstance(template, Param):
        name = template.name
        return lambda values, tensors: tensors[name]
    if isinstance(template, (tuple, list)) and _has_slots(template):
        parts = [compile_template(v) for v in template]
        kind = type(template)
        return lambda values, tensors: kind([p(values, tensors) for p in parts])
    if isinstance(template, dict) and _has_slots(template):
        items = [(k, compile_template(v)) for k, v in template.items()]
        return lambda values, tensors: {k: p(values, tensors) for k, p in items}
    if isinstance(template, slice) and _has_slots(template):
        start, stop, step = (
            compile_template(v) for v in (template.start, template.stop, template.step)
        )
        return lambda values, tensors: slice(
            start(values, tensors), stop(values, tensors), step(values, tensors)
        )
    return lambda values, tensors: template


def _has_slots(template: Any) -> bool:
    return bool(slots(template))


def slots(template: Any) -> list[Ref | Param]:
    """Every Ref and Param of a template, in order of appearance (inside tuples, lists, dict
    values and slice ends: fx's own walker, which visits exactly those)."""
    found: list[Ref | Param] = []
    map_aggregate(template, lambda v: found.append(v) if isinstance(v, (Ref, Param)) else None)
    return found


@dataclass
class Node:
    """One operation: ``op(*args, **kwargs)`` with templates whose Refs and Params are filled in.

    name:  unique within the graph (from torch.fx), e.g. ``layer1_0_conv1``.
    label: what a user reads in messages, e.g. ``layer1.0.conv1 (Conv2d)``.
    """

    index: int
    name: str
    label: str
    kind: str
    op: Operator | None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fill = compile_template((self.args, self.kwargs))
        refs = [s for s in slots((self.args, self.kwargs)) if isinstance(s, Ref)]
        self.refs: tuple[int, ...] = tuple(r.index for r in refs)
        self.box_refs: tuple[int, ...] = ()  # variable Refs in order: set by the Graph

    @property
    def first(self) -> int:
        """The node whose value is the first argument (the input of an affine node)."""
        return self.refs[0]

    @property
    def params(self) -> list[str]:
        return [s.name for s in slots((self.args, self.kwargs)) if isinstance(s, Param)]


Override = Callable[[Tensor], Tensor]


class Graph:
    """The nodes of a model, its tensors by name, and which of them are parameters.

    tensors:    every tensor the graph reads, by canonical name (the model's
                ``named_parameters()`` / ``named_buffers()`` names, deduplicated).
    parameters: the names in ``tensors`` that are parameters of the model.
    aliases:    every other name of a tied tensor -> its canonical name.
    """

    def __init__(
        self,
        nodes: list[Node],
        output: int,
        tensors: dict[str, Tensor],
        parameters: frozenset[str],
        aliases: dict[str, str],
        model_name: str,
        cache: dict[str, Any] | None = None,
    ) -> None:
        self.nodes = nodes
        self.output = output
        self.tensors = tensors
        self.parameters = parameters
        self.aliases = aliases
        self.model_name = model_name
        self.cache: dict[str, Any] = {} if cache is None else cache  # facts about the structure
        self.constants: dict[int, Any] = {}  # values of constant nodes, set by ``cast``
        for node in nodes:
            node.box_refs = tuple(i for i in node.refs if nodes[i].kind in (INPUT, VARIABLE))

    # ----------------------------------------------------------------------- views
    def with_tensors(self, tensors: dict[str, Tensor]) -> Graph:
        """The same graph reading other tensors (a cast, detached or live copy)."""
        return Graph(
            self.nodes,
            self.output,
            tensors,
            self.parameters,
            self.aliases,
            self.model_name,
            self.cache,
        )

    def cast(self, dtype: torch.dtype) -> Graph:
        """A copy computing in ``dtype`` (certificates run in float64), its ``constants`` (the
        values of the nodes that do not depend on the input) computed as the model computes
        them, in its own dtype, then cast: their rounding is the model's, not ``dtype``'s."""
        cast = self.with_tensors(
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.tensors.items()}
        )
        values: list[Any] = [None] * len(self.nodes)
        for node in self.nodes:
            if node.kind == CONSTANT:
                args, kwargs = node.fill(values, self.tensors)
                values[node.index] = node.op.forward(*args, **kwargs)
                value = values[node.index]
                cast.constants[node.index] = (
                    value.to(dtype)
                    if isinstance(value, Tensor) and value.is_floating_point()
                    else value
                )
        return cast

    def detached(self) -> Graph:
        return self.with_tensors({k: v.detach() for k, v in self.tensors.items()})

    @property
    def affine_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == VARIABLE and isinstance(n.op, Affine)]

    @property
    def valued(self) -> frozenset[int]:
        """The nodes whose values reach the output through values (not only through a shape
        read, ``h.shape[1]``): the only ones a backward pass sends coefficients to."""
        if "valued" not in self.cache:
            found, todo = {self.output}, [self.output]
            while todo:
                for ref in self.nodes[todo.pop()].box_refs:
                    if ref not in found:
                        found.add(ref)
                        todo.append(ref)
            self.cache["valued"] = frozenset(found)
        return self.cache["valued"]

    def uses(self) -> dict[str, list[Node]]:
        """Every node that reads each tensor (a tied parameter is read by several)."""
        found: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.params:
                found.setdefault(name, []).append(node)
        return found

    # ----------------------------------------------------------------------- running
    def run(
        self,
        x: Tensor,
        *,
        tensors: Mapping[str, Tensor] | None = None,
        overrides: Mapping[int, Override] | None = None,
        training: bool = False,
        record: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """The output at ``x``.

        tensors:   the tensors to read instead of ``self.tensors`` (a shared perturbation).
        overrides: ``overrides[k](h)`` replaces node k, given the value ``h`` of its first
                   argument (how per-example weight perturbations enter affine nodes).
        training:  training-mode BatchNorm and Dropout (the live model's own buffers update).
        record:    sees ``(k, h)`` for every overridden node before it runs.
        """
        source = self.tensors if tensors is None else tensors
        values: list[Any] = [None] * len(self.nodes)
        values[0] = x
        for node in self.nodes[1:]:
            if overrides is not None and node.index in overrides:
                h = values[node.first]
                if record is not None:
                    record(node.index, h)
                values[node.index] = overrides[node.index](h)
                continue
            args, kwargs = node.fill(values, source)
            op = node.op
            values[node.index] = (
                op.forward_train(*args, **kwargs) if training else op.forward(*args, **kwargs)
            )
        return values[self.output]

    __call__ = run

    def values(self, x: Tensor) -> list[Any]:
        """Every node's value at ``x`` (eval mode): shapes and types, for reading and checks."""
        values: list[Any] = [None] * len(self.nodes)
        values[0] = x
        for node in self.nodes[1:]:
            args, kwargs = node.fill(values, self.tensors)
            values[node.index] = node.op.forward(*args, **kwargs)
        return values
