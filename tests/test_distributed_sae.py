"""Data parallelism of the SAE itself: two ranks on two halves of a batch equal one process on all of it."""

import torch

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.parallel import sum_gradients

from distributed import run_ranks
from helpers import TwoLayerMLP

CONFIG = dict(k=3, num_latents=24, target_modules=["down"], dead_tokens_threshold=5)


def two_steps(x: torch.Tensor, group=None, mask=None):
    """Two capture steps (b_dec init, dead counters, AuxK active on the second); returns what must agree."""
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(**CONFIG))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fvus, auxks = [], []
    for _ in range(2):
        with model.capture(token_mask=mask, group=group) as outputs:
            model(x)
        outputs["down"].loss.backward()
        fvus.append(outputs["down"].fvu.detach().clone())
        auxks.append(outputs["down"].auxk.detach().clone())
    sum_gradients(params, group)
    layer = model.get_base_model().down
    return {
        "b_dec": layer.sae_b_dec["default"].detach(),
        "counters": layer.sae_tokens_since_fired["default"].clone(),
        "grads": [p.grad.clone() for p in params],
        "fvu": fvus,
        "auxk": auxks,
    }


def _rank(rank, world_size, x, mask, expected, result_file):
    import torch.distributed as dist

    got = two_steps(x[rank::world_size], dist.group.WORLD, mask[rank::world_size])
    fvus = torch.stack(got["fvu"] + got["auxk"])
    dist.all_reduce(fvus)  # each rank's FVU and AuxK are its shares of the global ones
    torch.testing.assert_close(got["b_dec"], expected["b_dec"])
    assert torch.equal(got["counters"], expected["counters"])
    for g, e in zip(got["grads"], expected["grads"]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fvus, torch.stack(expected["fvu"] + expected["auxk"]))
    if rank == 0:
        torch.save(True, result_file)


def test_two_ranks_equal_one_process(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    mask = torch.rand(12) > 0.2
    expected = two_steps(x, mask=mask)
    assert expected["auxk"][1] > 0  # some latents died after the first step, so AuxK took part
    run_ranks(_rank, 2, x, mask, expected, tmp_path / "ok")
    assert (tmp_path / "ok").exists()
