"""compile_blocks: every decoder layer compiled (the SAE's host layer, not the SAE), same results as eager."""

import torch

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.models import compile_blocks
from megasae.peft import sae_layers

from helpers import tiny_llama


def test_compiled_blocks_train_like_eager():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        config = TopKSaeConfig(k=4, num_latents=32, target_modules=["model.layers.1"])
        model = get_peft_sae_model(tiny_llama(num_layers=3), config)
        model.train()
        if compiled:
            assert compile_blocks(model) == 3
            (sae_layer,) = sae_layers(model)
            assert sae_layer._compiled_call_impl is None  # the SAE itself stays eager
            assert sae_layer.get_base_layer()._compiled_call_impl is not None
        with model.stop_after_targets() as outputs:
            model(input_ids=ids)
        outputs["model.layers.1"].loss.backward()
        (sae_layer,) = sae_layers(model)
        results.append((outputs["model.layers.1"].x_hat.detach(), sae_layer.sae_W_enc["default"].grad))
    (eager_x_hat, eager_grad), (compiled_x_hat, compiled_grad) = results
    torch.testing.assert_close(compiled_x_hat, eager_x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-6)
