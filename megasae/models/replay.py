"""A stand-in host for training from an activation cache: one module per cached target, at the target's own
module path, that returns the cached output. SAEs attach to it as to the real host, so the adapter they
save has the real host's keys and loads onto it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megasae.data.activations import tensor_names


class ReplayTarget(nn.Module):
    """Returns the cached output of its target; a transcoder's SAE reads the cached input, its first
    argument. `hidden_size` is the width SAEs read, as on a Hugging Face decoder layer."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden_size = width
        # peft places an adapter on the device of its module's weight; this one holds no numbers.
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: Tensor, output: Tensor | None = None) -> Tensor:
        return x if output is None else output


class ReplayHost(nn.Module):
    """Runs each cached target on its rows, in the order of the cache's manifest."""

    def __init__(self, targets: dict[str, dict]):
        super().__init__()
        self.targets = targets  # module path -> {"width", "transcode"}
        for path, target in targets.items():
            parent = self
            *parents, name = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name, ReplayTarget(target["width"]))

    def forward(self, **rows: Tensor) -> None:
        for path, target in self.targets.items():
            self.get_submodule(path)(*(rows[name] for name in tensor_names(path, target["transcode"])))
