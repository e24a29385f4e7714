"""The training loop: truncated host forward -> FVU + AuxK per target -> backward through the SAEs only
-> summed data-parallel gradients -> Adam -> decoder renormalisation; checkpoints that resume exactly.

Under --pp each pipeline stage trains the SAEs on its own layers: every stage reads the same micro-batches,
stage 0 runs the embeddings and hands each later stage the hidden state, and a stage that owns no target
only relays it. The gradient norm, the metrics and the saved adapter cover all stages; the last stage,
which always owns the last target, writes the adapter."""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from megasae.collectives.latents import gather_rows, shard_rows
from megasae.data import DataColumns, build_batches, open_source
from megasae.data.activations import ActivationBatches, read_manifest
from megasae.dtypes import DTYPES
from megasae.errors import Interrupted
from megasae.eval.held_out import HeldOutEval, held_out_record
from megasae.files import staging_directory
from megasae.formats.adapter import adapter_path, add_stage_saes
from megasae.formats.adapter import read as read_adapter
from megasae.models import compile_blocks
from megasae.models.loading import DEFAULT_MODEL_NAME
from megasae.models.replay import ReplayHost
from megasae.parallel import ParallelState, init_distributed, sum_over_ranks
from megasae.parallel.distributed import merge_over_stages
from megasae.parallel.host import build_host
from megasae.parallel.pipeline import run_to_targets
from megasae.peft import PeftSaeModel, get_peft_sae_model, sae_layers
from megasae.peft.control import adapter_parameters, sae_keys
from megasae.peft.shard import full_state_dict, load_whole_sae, shard_saes, sharded_parameters
from megasae.token_policy import DEFAULT_TOKEN_POLICY
from megasae.train.cache import CacheConfig
from megasae.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, saved_config
from megasae.train.config import TrainConfig
from megasae.train.metrics import MetricsLog, StepMetrics
from megasae.train.report import write_curves
from megasae.train.run_dir import check_output_dir, clear_run, publish_adapter, roll_back_metrics
from megasae.train.step import sae_step


def warmup_then_linear_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(total_steps - step, 0) / max(total_steps - warmup_steps, 1)

    return factor


def make_optimizer(groups: list[dict], zero1: bool, device: torch.device):
    """Adam over parameter groups that each name their own "lr", fused on CUDA (apex's FusedAdam when
    installed), foreach on CPU; ZeRO-1 shards its state."""
    if zero1:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.Adam, foreach=True)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups)
        except ImportError:
            return torch.optim.Adam(groups, fused=True)
    return torch.optim.Adam(groups, foreach=True)


class StopRequested:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so a step is never cut in half;
    a second Ctrl-C interrupts at once. `signum` is the first signal received (0: none)."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: TrainConfig, par: ParallelState | None = None):
        self.cfg = cfg
        self.par = par or init_distributed(cfg.device, tp=cfg.tp, pp=cfg.pp)
        if cfg.zero1 and (self.par.tp_size > 1 or self.par.pp_size > 1):
            raise ValueError(
                "--zero1 shards Adam's state over data-parallel ranks only; drop it with --tp or --pp > 1."
            )
        self.micro_tokens = cfg.micro_batch_size * cfg.ctx_len
        per_step = self.micro_tokens * self.par.dp_size
        if cfg.batch_tokens % per_step:
            raise ValueError(
                f"--batch-tokens ({cfg.batch_tokens}) must be a multiple of micro-batch-size x ctx-len x "
                f"data-parallel ranks ({cfg.micro_batch_size} x {cfg.ctx_len} x {self.par.dp_size} = "
                f"{per_step})."
            )
        self.accumulation = cfg.batch_tokens // per_step
        self.steps = cfg.steps()
        if cfg.eval_every > 0 and cfg.eval_data is None:
            raise ValueError(
                "--eval-every needs --eval-data: a Parquet file or directory of held-out rows, or 'builtin'."
            )
        check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
        checkpoint = self._checkpoint_to_resume() if cfg.resume else None

        data_columns = DataColumns.of(cfg)
        self.host_name, self.data_name = cfg.model or DEFAULT_MODEL_NAME, cfg.data
        if cfg.activations is not None:
            host, self.stage, targets = self._replay_host(), None, list(cfg.target_modules)
            self.batches = ActivationBatches(cfg.activations, self.micro_tokens, self.par.dp_rank,
                                             self.par.dp_size, cfg.seed)
        else:
            data_args = dict(seed=cfg.seed, columns=data_columns)
            open_source(cfg.data, **data_args)  # bad data fails here, not after minutes of loading the host
            built = build_host(cfg.model, list(cfg.target_modules), self.par, DTYPES[cfg.dtype])
            host, self.processor, self.stage, targets = (built.host, built.processor, built.stage,
                                                         built.targets)
            self.batches = build_batches(
                cfg.data, self.processor, ctx_len=cfg.ctx_len, batch_size=cfg.micro_batch_size,
                rank=self.par.dp_rank, world_size=self.par.dp_size, shuffle_sequences=cfg.shuffle_sequences,
                **data_args
            )
        self._check_first_batch()
        # The first data-parallel replica evaluates (all its tensor-parallel ranks and pipeline stages: the
        # host forward and the latent-parallel SAEs need each of them); the others wait at the next step.
        self.held_out = HeldOutEval(
            cfg.eval_data, self.processor, self.par.device, cfg.outlier_factor, max_tokens=cfg.eval_tokens,
            ctx_len=cfg.ctx_len, batch_size=cfg.micro_batch_size, seed=cfg.seed, columns=data_columns,
        ) if cfg.eval_every > 0 and self.par.dp_rank == 0 else None
        self.saes = cfg.saes()  # one SAE per target, or a sweep's several
        self.sae_configs = {s.name: cfg.peft_config(
            s, list(cfg.target_modules), base_model_name_or_path=self.host_name, dataset=self.data_name,
            ctx_len=cfg.ctx_len,
            token_policy={**DEFAULT_TOKEN_POLICY, "outlier_factor": cfg.outlier_factor, "tokens": cfg.tokens},
        ) for s in self.saes}
        self.host = host
        torch.manual_seed(cfg.seed)  # each SAE's init derives from it (and its module path) on every rank
        # A pipeline stage that owns no target has no SAE: it only relays the hidden state.
        self.model: PeftSaeModel | None = self._attach_saes(host, targets) if targets else None
        saes_here, self.params = {}, []  # each SAE's (layer, adapter) by the key of its outputs
        if self.model is not None:
            shard_saes(self.model, self.par.tp_group)  # one process's init, each TP rank keeping its latents
            self.model.train()
            if cfg.compile:
                compile_blocks(self.model)
            saes_here = sae_keys(self.model)
            # In the optimizer's order (its state dict numbers them so): one parameter group per SAE.
            self.params = [p for s in self.saes for p in adapter_parameters(self.model, s.name)]
        self.num_latents = {key: layer.num_latents(adapter) for key, (layer, adapter) in saes_here.items()}
        # Each SAE's learning rate follows its widest target, over all stages.
        widths = merge_over_stages(
            {key: (adapter, self.num_latents[key]) for key, (_, adapter) in saes_here.items()}, self.par
        )
        self.lr = {s.name: s.learning_rate(max(n for adapter, n in widths.values() if adapter == s.name))
                   for s in self.saes}
        self.lr_factor = warmup_then_linear_decay(cfg.warmup_steps, self.steps)
        self.optimizer, self.schedule = None, None
        if self.params:
            groups = [{"params": adapter_parameters(self.model, s.name), "lr": self.lr[s.name]}
                      for s in self.saes]
            self.optimizer = make_optimizer(groups, cfg.zero1, self.par.device)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step = 0
        self.tokens = 0
        if checkpoint is not None:
            self._restore(checkpoint)

    def _attach_saes(self, host: torch.nn.Module, targets: list[str]) -> PeftSaeModel:
        """The host with each SAE of the run on every one of `targets`: a PEFT adapter per SAE, all active."""
        first, *others = self.saes
        model = get_peft_sae_model(
            host, dataclasses.replace(self.sae_configs[first.name], target_modules=targets), first.name
        )
        for s in others:
            model.add_adapter(s.name, dataclasses.replace(self.sae_configs[s.name], target_modules=targets))
        if others:
            model.base_model.set_adapter([s.name for s in self.saes])  # all train, side by side
        return model

    def _checkpoint_to_resume(self) -> Path:
        """The latest checkpoint, refused when this run changes a setting that changes the SAE or the data."""
        cfg = self.cfg
        checkpoint = latest_checkpoint(cfg.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume was given but {cfg.output_dir} holds no checkpoint to resume from."
            )
        saved = saved_config(checkpoint)
        changed = cfg.resume_differences(saved) if saved is not None else []
        if changed:
            raise ValueError(
                f"--resume: this run changes {'; '.join(changed)} from the checkpoint {checkpoint}; "
                "resume with the same settings (only how long the run goes, how it logs, checkpoints and "
                "evaluates, and the device may change: README, 'Failure and recovery') or start afresh "
                "with --overwrite."
            )
        return checkpoint

    def _replay_host(self) -> ReplayHost:
        """The stand-in host of an activation cache, refused when the run asks for another host, data or
        targets than the cache holds."""
        cfg, manifest = self.cfg, read_manifest(self.cfg.activations)
        if self.par.tp_size > 1 or self.par.pp_size > 1 or cfg.eval_every > 0:
            raise ValueError("--activations trains without the host: --tp, --pp and --eval-every need it.")
        # --model and --data left at their defaults mean the cache's; given, they must be the cache's.
        asked = CacheConfig(output_dir=cfg.activations, model=cfg.model, data=cfg.data).settings()
        for key, default in (("model", None), ("data", "builtin")):
            if getattr(cfg, key) != default and manifest["settings"][key] != asked[key]:
                raise ValueError(f"--activations {cfg.activations} holds the activations of --{key} "
                                 f"{manifest['settings'][key]}, not of {asked[key]}.")
        self.host_name, self.data_name = manifest["settings"]["model"], manifest["settings"]["data"]
        if manifest["settings"]["transcode"] != cfg.transcode:
            raise ValueError(f"--activations {cfg.activations} was cached with transcode="
                             f"{manifest['settings']['transcode']}; --transcode must match it.")
        targets = {}
        for wanted in cfg.target_modules:
            found = [p for p in manifest["targets"] if p == wanted or p.endswith(f".{wanted}")]
            if not found:
                raise ValueError(
                    f"--activations {cfg.activations} holds no activations of {wanted!r}; it holds "
                    f"{', '.join(manifest['targets'])}."
                )
            targets.update({p: manifest["targets"][p] for p in found})
        self.processor = None
        return ReplayHost(targets)

    def _check_first_batch(self) -> None:
        """Read one batch now, so data that yields no sequence fails before anything is written."""
        state = self.batches.state_dict()
        next(self.batches)
        self.batches.load_state_dict(state)

    # -- one optimizer step ----------------------------------------------------------------------

    def train_step(self) -> tuple[StepMetrics, int]:
        """One optimizer step; returns its metrics and the real (non-padding) tokens this rank read."""
        metrics = StepMetrics()
        tokens = 0
        for _ in range(self.accumulation):
            batch = next(self.batches)
            inputs = {k: v.to(self.par.device) for k, v in batch.inputs.items()}
            outputs = self._forward(inputs, batch.token_mask, self.par.dp_group)
            if outputs:
                loss = sum(out.loss for out in outputs.values()) / self.accumulation
                loss.backward()
            metrics.add(outputs, self.num_latents)
            tokens += batch.num_tokens
        sae_step(self.model, self.optimizer, self.par, self.cfg.grad_clip, [s.name for s in self.saes])
        if self.schedule is not None:
            self.schedule.step()
        self.step += 1
        return metrics, tokens

    def _forward(self, inputs: dict, token_mask: torch.Tensor, group: dist.ProcessGroup | None) -> dict:
        """One micro-batch through the host (this rank's stage of it): the SAE outputs of its targets, with
        b_dec's first mean, FVU's denominator and the dead counters over the ranks of `group`."""
        model = self.model if self.model is not None else self.host  # the bare host on a relay stage
        return run_to_targets(model, self.stage, inputs, token_mask=token_mask,
                              outlier_factor=self.cfg.outlier_factor, group=group)

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> Path:
        cfg, par = self.cfg, self.par
        if par.is_main:
            if cfg.overwrite:
                clear_run(cfg.output_dir)
            if cfg.resume:
                roll_back_metrics(cfg.output_dir, self.step)
            (cfg.output_dir / "config.json").write_text(cfg.to_json())
        log = MetricsLog(
            cfg.output_dir, self.steps * cfg.batch_tokens, self.tokens, par.is_main, cfg.wandb_mode,
            cfg.wandb_project, {"train": vars(cfg)},
        )
        stop = StopRequested()
        next_save = self._next_save_point()
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < self.steps:
                metrics, tokens = self.train_step()
                # One small all-reduce a step: the real token count and whether any rank was told to stop.
                # Every rank votes; the ranks of a TP group or a pipeline read the same tokens: one counts.
                own_tokens = tokens if par.counts_tokens else 0
                tokens, stop_votes = sum_over_ranks([own_tokens, stop.requested], par.world_group, par.device)
                self.tokens += int(tokens)
                window_tokens += tokens
                log.advance(int(tokens))
                evaluate = cfg.eval_every > 0 and self.step % cfg.eval_every == 0
                if self.step % cfg.log_every == 0 or self.step == self.steps or evaluate:
                    record = self._summarise(metrics, window_tokens / (time.perf_counter() - window_start))
                    if self.held_out is not None and evaluate:
                        # The first replica reads the held-out rows alone: no data-parallel group.
                        forward = lambda inputs, mask: self._forward(inputs, mask, None)  # noqa: E731
                        per_target = merge_over_stages(self.held_out(self.model, forward), self.par)
                        record.update(held_out_record(per_target))
                    log.log(record)
                    window_start, window_tokens = time.perf_counter(), 0
                if stop_votes > 0:
                    saved = self.save_checkpoint()
                    signum = stop.signum or signal.SIGTERM  # another rank received it
                    raise Interrupted(
                        signum, f"checkpoint {saved} holds step {self.step}; continue with --resume."
                    )
                if next_save is not None and self.tokens >= next_save and self.step < self.steps:
                    self.save_checkpoint()
                    next_save += cfg.save_every
            self.save_checkpoint()
            self._save_final_adapter()
            if par.is_main:
                write_curves(cfg.output_dir, cfg.target_modules[0])
        finally:
            stop.restore()
            log.close()
        return cfg.output_dir

    def _next_save_point(self) -> int | None:
        every = self.cfg.save_every
        return None if every <= 0 else (self.tokens // every + 1) * every

    def _summarise(self, metrics: StepMetrics, tokens_per_s: float) -> dict:
        names, values = metrics.flat()
        summed = dict(zip(names, sum_over_ranks(values, self.par.dp_group, self.par.device)))
        summed = merge_over_stages(summed, self.par)
        record = {"step": self.step, "tokens": self.tokens}
        record.update(metrics.summarise(summed, self.par.dp_size))
        for name, lr in self.lr.items():  # what the schedule set for the next step
            record["lr" if len(self.lr) == 1 else f"lr/{name}"] = lr * self.lr_factor(self.step)
        record["tokens_per_s"] = tokens_per_s
        return record

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)
            optimizer_state = self.optimizer.state_dict() if self.par.is_main else None
        else:
            optimizer_state = self._reshard_optimizer_state(self.optimizer.state_dict(), gather_rows) \
                if self.optimizer is not None else None
        layers = sae_layers(self.model) if self.model is not None else []
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": optimizer_state,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "data": self.batches.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "dead_counters": {
                layer.module_path: dict(layer.sae_tokens_since_fired.items()) for layer in layers
            },
            "needs_init": {layer.module_path: dict(layer.sae_needs_init) for layer in layers},
        }
        return save_checkpoint(self.cfg.output_dir, self.step, self.par, self._save_adapter, state,
                               self.cfg.to_json())

    def _restore(self, checkpoint: Path) -> None:
        for s in self.saes:
            self._restore_sae(checkpoint, s.name)
        state = load_trainer_state(checkpoint, self.par)  # ZeRO-1's whole state too: rank 0 wrote it
        if self.optimizer is not None and not isinstance(self.optimizer, ZeroRedundancyOptimizer):
            state["optimizer"] = self._reshard_optimizer_state(state["optimizer"], shard_rows)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        for layer in sae_layers(self.model) if self.model is not None else []:
            for adapter_name, counters in state["dead_counters"][layer.module_path].items():
                layer.sae_tokens_since_fired[adapter_name].copy_(counters)
            layer.sae_needs_init.update(state["needs_init"][layer.module_path])
        self.step, self.tokens = state["step"], state["tokens"]

    def _restore_sae(self, checkpoint: Path, adapter: str) -> None:
        """One SAE of the run from the adapter saved in `checkpoint` (a sweep's in its subdirectory): whole
        SAEs, of which a latent-parallel rank keeps its rows."""
        saved = read_adapter(adapter_path(checkpoint, adapter)).saes
        for layer in sae_layers(self.model) if self.model is not None else []:
            if layer.module_path not in saved:
                raise ValueError(
                    f"Checkpoint {checkpoint} has no SAE on {layer.module_path!r}: it was written for other "
                    "target modules."
                )
            load_whole_sae(layer, adapter, saved[layer.module_path])

    def _reshard_optimizer_state(self, state: dict, reshard) -> dict:
        """`state` (an optimizer state dict) with the per-latent moments of latent-parallel SAEs passed
        through `reshard`: gather_rows to save them whole, shard_rows to keep this rank's latents of whole
        ones. The optimizer's own moments are never modified."""
        if self.par.tp_group is None:
            return state
        sharded = sharded_parameters(self.model)
        per_param = dict(state["state"])
        for index, param in enumerate(self.params):
            if id(param) in sharded and index in per_param:
                per_param[index] = {
                    key: (
                        reshard(value, self.par.tp_group) if torch.is_tensor(value) and value.dim() else value
                    )
                    for key, value in per_param[index].items()
                }
        return {**state, "state": per_param}

    def _whole_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Every SAE tensor of every stage, whole, on the writer rank (None elsewhere). Every rank calls it:
        latent-parallel SAEs gather their shards, and the stages send theirs to the writer."""
        state = {}
        if self.model is not None:
            state = {key: t for key, t in full_state_dict(self.model).items() if ".sae_" in key}
        if self.par.pp_group is not None and self.par.leads_stage:
            parts = [None] * self.par.pp_size if self.par.is_writer else None
            dist.gather_object(state, parts, dst=self.par.writer_rank, group=self.par.pp_group)
            if parts is not None:
                state = {key: t for part in parts for key, t in part.items()}
        return state if self.par.is_writer else None

    def _save_adapter(self, directory: str | Path) -> None:
        """The whole run's adapter (every target of every stage) as standard PEFT files in `directory`."""
        state = self._whole_adapter_state()
        if state is None:
            return
        self.model.save_pretrained(directory, state_dict=state)  # PEFT writes this stage's SAEs ...
        if self.par.pp_size > 1:
            for s in self.saes:  # ... and the other stages' join
                add_stage_saes(adapter_path(directory, s.name), state, list(self.cfg.target_modules), s.name)

    def _save_final_adapter(self) -> None:
        """The output directory ends as a standard PEFT adapter (a sweep's: one in a subdirectory per SAE),
        never a mix of two (see publish_adapter)."""
        if not self.par.is_writer:
            self._whole_adapter_state()
            return
        with staging_directory(self.cfg.output_dir / "adapter") as staged:
            self._save_adapter(staged)
            publish_adapter(staged, self.cfg.output_dir, [s.name for s in self.saes])


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).fit()
