"""Forward-only pipeline: two stages (and two stages of two TP ranks) give the single-process hidden states
after each stage's last layer and the single-process logits on the last stage, for every text family (Gemma
2: layers of different attention kinds on one stage, capped logits), and an SAE on the stage owning its
target gives the single-process SAE (fp32; rtol 1e-5, atol 1e-5)."""

import pytest
import torch

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.parallel import ParallelState, init_distributed, shard_model
from megasae.parallel.architectures import ARCHITECTURES
from megasae.parallel.distributed import _new_groups
from megasae.parallel.pipeline import PipelineStage, stage_targets

from data_fixtures import tiny_qwen25vl_processor
from distributed import run_ranks
from parallel_hosts import TEXT_HOSTS, hidden_after, image_chat_inputs, tiny_qwen25vl

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = ["model.layers.1", "model.layers.3"]
LLAMA = ARCHITECTURES["llama"]


def four_layer(family: str = "llama"):
    return TEXT_HOSTS[family](kv_heads=2, num_hidden_layers=4)


def padded_ids():
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _sae(host, targets):
    torch.manual_seed(0)
    return get_peft_sae_model(host, TopKSaeConfig(k=4, num_latents=128, target_modules=targets)).train()


def _hidden_rank(rank, world_size, model, inputs, expected, tp, last_layer):
    par = init_distributed("cpu", tp=tp, pp=2)
    shard_model(model, par.tp_group, par.tp_rank, par.tp_size)
    stage = PipelineStage(model, par, last_layer)
    torch.testing.assert_close(stage.forward(model, **inputs), expected[par.pp_rank], **TOLERANCE)
    logits = stage.logits(model, **inputs)  # the stages cover every layer: the last runs the tail
    if par.is_last_stage:
        torch.testing.assert_close(logits, expected[2], **TOLERANCE)
    else:
        assert logits is None


def _expected(model, inputs, layers):
    with torch.no_grad():
        logits = model(**inputs).logits
    return [*(hidden_after(model, i, inputs) for i in layers), logits]


@pytest.mark.parametrize("family", TEXT_HOSTS)
def test_pp2_threads_masks_and_rotary_positions(family):
    model, inputs = four_layer(family), padded_ids()
    run_ranks(_hidden_rank, 2, model, inputs, _expected(model, inputs, (1, 3)), 1, 3)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_tp2_pp2_on_four_ranks(family):
    model, inputs = four_layer(family), padded_ids()
    run_ranks(_hidden_rank, 4, model, inputs, _expected(model, inputs, (1, 3)), 2, 3)


def test_pp2_qwen25vl_threads_multimodal_rope_positions():
    processor = tiny_qwen25vl_processor()
    model, inputs = tiny_qwen25vl(processor), image_chat_inputs(processor)
    run_ranks(_hidden_rank, 2, model, inputs, _expected(model, inputs, (0, 1)), 1, 1)


def _sae_rank(rank, world_size, host, inputs, expected):
    par = init_distributed("cpu", pp=2)
    stage = PipelineStage(host, par, last_layer=3)
    [target] = stage_targets(stage.arch, TARGETS, 3, par)
    assert target == TARGETS[par.pp_rank]
    model = _sae(host, [target])
    # The one-process reference drew both SAEs from one seed; give this stage's SAE the same weights.
    layer = model.get_base_model().get_submodule(target)
    for name, tensor in expected[target]["weights"].items():
        getattr(layer, name)["default"].data.copy_(tensor)
    with model.capture(token_mask=inputs["attention_mask"].bool()) as outputs:
        stage.forward(model, **inputs)
    torch.testing.assert_close(outputs[target].x_hat, expected[target]["x_hat"], **TOLERANCE)
    torch.testing.assert_close(outputs[target].fvu, expected[target]["fvu"], **TOLERANCE)


def test_pp2_sae_lives_on_the_stage_that_owns_its_target():
    host, inputs = four_layer(), padded_ids()
    reference = _sae(four_layer(), TARGETS)
    with reference.capture(token_mask=inputs["attention_mask"].bool()) as outputs:
        reference(**inputs)
    expected = {}
    for target in TARGETS:
        layer = reference.get_base_model().get_submodule(target)
        weights = {name: getattr(layer, name)["default"].detach().clone()
                   for name in ("sae_W_enc", "sae_b_enc", "sae_W_dec")}
        expected[target] = {"weights": weights, "x_hat": outputs[target].x_hat.detach(),
                            "fvu": outputs[target].fvu.detach()}
    run_ranks(_sae_rank, 2, host, inputs, expected)


def test_a_target_no_stage_owns_is_refused():
    par = ParallelState(rank=1, world_size=2, pp_size=2)
    assert stage_targets(LLAMA, TARGETS, 3, par) == ["model.layers.3"]
    with pytest.raises(
        ValueError, match=r"'model.layers.3' is in decoder layer 3, which no pipeline stage owns"
    ):
        stage_targets(LLAMA, TARGETS, 2, par)


def test_rank_roles_follow_the_groups():
    """Every rank role of ParallelState agrees with the process groups built for the same layout."""
    tp, pp, world_size = 2, 3, 12
    tp_groups, _, pp_groups = _new_groups(world_size, tp, pp)
    writer_pipeline = next(ranks for ranks in pp_groups if 0 in ranks)
    for rank in range(world_size):
        par = ParallelState(rank=rank, world_size=world_size, tp_size=tp, pp_size=pp)
        pipeline = next(ranks for ranks in pp_groups if rank in ranks)
        assert [par.stage_rank(s) for s in range(pp)] == pipeline
        if not par.is_first_stage:
            assert par.prev_stage_rank == pipeline[par.pp_rank - 1]
        if not par.is_last_stage:
            assert par.next_stage_rank == pipeline[par.pp_rank + 1]
        assert (par.is_first_stage, par.is_last_stage) == (rank == pipeline[0], rank == pipeline[-1])
        assert par.writer_rank == writer_pipeline[-1]
        assert par.leads_stage == (rank in writer_pipeline)
        first_stage_tp_leads = [ranks[0] for ranks in tp_groups if ranks[0] < world_size // pp]
        assert par.counts_tokens == (rank in first_stage_tp_leads)
