"""What the bound passes can follow: a value computed from the input is bounded only as a
tensor (a Box). A value read from the input that is not one tensor (an LSTM's
``(output, (h, c))`` tuple, a ``torch.split``, ``x.max().item()``) would be taken as exact at one
point of the input region, an unsound bound: certificates refuse it, naming it. Reading the
input's metadata (``x.size(0)``, ``x.shape``) is exact and allowed."""

from __future__ import annotations

import torch

from ..errors import UnsupportedLayerError
from ..model.graph import CONSTANT, SHAPE, VARIABLE, Graph, Node
from ..model.operators.base import Operator
from ..model.operators.call import Call

_METADATA_METHODS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
}
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


def _reads_metadata(node: Node) -> bool:
    """The node reads only what a tensor's shape, dtype or device says, never its values."""
    op = node.op
    if not isinstance(op, Call):
        return False
    if op.fn in _METADATA_METHODS:
        return True
    return op.fn is getattr and len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES


def check_bounded(graph: Graph) -> None:
    """Raise UnsupportedLayerError at the first node that computes from the input's values
    something the bound passes would hold fixed: a non-tensor value (a tuple of tensors, a
    number) read from a tensor that depends on the input, or a tensor computed by an
    operation without bounds (a module run as it is, an unlisted function): before any bound
    pass or chunk runs."""
    for node in graph.nodes[1:]:
        if node.kind == VARIABLE and type(node.op).interval is Operator.interval:
            raise node.op.unsupported("interval bounds")
        if node.kind != SHAPE:
            continue
        reads_values = any(graph.nodes[i].kind not in (CONSTANT, SHAPE) for i in node.refs)
        if reads_values and not _reads_metadata(node):
            raise UnsupportedLayerError(
                f"operation {node.label} computes from the input a value that is not one "
                "tensor (a tuple of tensors, as an LSTM or GRU returns, or a number): "
                "certificates (ibp, crown, ...) cannot bound it; attacks work on it "
                "(docs/models.md, 'Supported operations')"
            )
