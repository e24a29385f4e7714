"""torch.compile for host models, one repeated block at a time (as torchtitan compiles transformer blocks).

Compiling each decoder layer instead of the whole model keeps the compile short (identical layers
share one graph), leaves the SAE layers, their hooks and the early stop after the last target in
eager mode, and fuses what eager runs op by op (norms, rotary embeddings, the gated MLP).
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def compile_blocks(model: nn.Module) -> int:
    """Compile in place every block of the model's repeated-block lists (an nn.ModuleList of two or more
    modules of one class, such as the decoder layers); a block carrying an SAE has its host layer
    compiled, not the SAE. Returns the number of blocks compiled."""
    compiled = 0
    for blocks in model.modules():
        if not isinstance(blocks, nn.ModuleList) or len(blocks) < 2:
            continue
        hosts = [_unwrapped(block) for block in blocks]
        if len({type(host) for host in hosts}) != 1:
            continue
        for host in hosts:
            host.compile()
        compiled += len(hosts)
    return compiled
