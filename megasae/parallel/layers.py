"""Tensor-parallel layers for a frozen host, Megatron style.

Each is a plain nn.Linear / nn.Embedding holding this rank's slice of the weight (so state dicts,
dtypes and devices behave as usual) with the communication its split needs in forward:

- ColumnParallelLinear: output features split; the input is replicated, the output stays split.
- RowParallelLinear: input features split (the output of a column-parallel layer); the partial
  outputs are all-reduced and the bias, held whole, is added once after the sum.
- VocabParallelEmbedding: rows [vocab_start, vocab_start + num_embeddings) of the table; ids owned
  elsewhere look up zeros and the all-reduce fills them in; with a `scale` (Gemma's sqrt(hidden)) rows
  are multiplied by it in the weight's dtype, as the host's own scaled embedding does.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megasae.collectives.autograd import copy_to_group, reduce_from_group


class ColumnParallelLinear(nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup | None, **kw
    ):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup | None, **kw
    ):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    def __init__(
        self,
        vocab_start: int,
        num_embeddings: int,
        embedding_dim: int,
        group: dist.ProcessGroup | None,
        scale: Tensor | None = None,
        **kw,
    ):
        super().__init__(num_embeddings, embedding_dim, **kw)
        self.vocab_start = vocab_start
        self.group = group
        self.embed_scale = None if scale is None else nn.Buffer(scale, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        out = out.masked_fill(elsewhere.unsqueeze(-1), 0)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.weight.dtype)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab_start={self.vocab_start}, " + super().extra_repr()
