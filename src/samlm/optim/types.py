"""Type aliases of the optimizer core: what a step takes, and what a torch optimizer holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from torch import Tensor

# One batch: a tensor, a tuple of tensors or a mapping of tensors, batch dimension first
# (batching.py). Any: the user's forward and loss take their own batch type (a dict, a tuple...).
Batch: TypeAlias = Any
# forward(batch) -> outputs: the logits, a tensor with the batch dimension first
ForwardFn: TypeAlias = Callable[[Batch], Tensor]
# loss(outputs, batch) -> the batch's mean loss, a 0-dim tensor
LossFn: TypeAlias = Callable[[Tensor, Batch], Tensor]
# Reduces the local squared norm of some tensors to the global one (e.g. summed over FSDP shards)
GradNormFn: TypeAlias = Callable[[Tensor], Tensor]

# A torch optimizer's parameter group ("params", "lr", ...) and one parameter's state ("step",
# "exp_avg_sq", ...), as torch types them
ParamGroup: TypeAlias = dict[str, Any]
ParamState: TypeAlias = dict[str, Any]
