"""The one trainer: offline pairs through any loss plug-in, on accelerate.

Per optimiser step: the step's pairs are split over processes and micro-batches; the loss plug-in
gets global normalisers (pairs / tokens of the whole step), so the micro-batch losses add up to the
step loss whatever the split; each micro-batch's loss is scaled by world size x accumulation steps
because DDP and accelerate average those away. The trainer asks the loss what it needs
(`needs_reference`) and never names a loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain import checkpoint as ckpt
from posttrain import distributed, memory, online
from posttrain.config import Recipe, recipe_to_dict
from posttrain.core import Normaliser, PolicyLogProbs
from posttrain.data.layout import PairRows, build_pair_rows, shared_length
from posttrain.data.sources import load_pairs
from posttrain.data.tokenize import TokenizedPair
from posttrain.errors import PosttrainError, RecipeError
from posttrain.eval.ranking import PairScores, attention_kind, choose_layout, custom_mask_supported, model_dtype
from posttrain.eval.training import heldout_evaluation, sharded_scores
from posttrain.logs import MetricsWriter, get_logger
from posttrain.losses import PairLossInputs, build_loss
from posttrain.models import load_policy_and_reference, resolve_model_path
from posttrain.runtime import make_accelerator, rng_state, seed_everything, write_run_record

# Recipe sections that may change between a checkpoint and its resume without --force.
RESUME_FREE_KEYS = {"logging", "eval", "checkpoint"}


class StepPlan:
    """Which pairs each optimiser step trains on: a seeded permutation per epoch, cut into global
    batches (the last batch of an epoch may be short). Every process computes the same plan, so the
    data position of a checkpoint is just its step number."""

    def __init__(self, num_pairs: int, batch_size: int, epochs: int, seed: int, shuffle: bool,
                 max_steps: Optional[int] = None):
        self.num_pairs, self.batch_size, self.seed, self.shuffle = num_pairs, batch_size, seed, shuffle
        self.steps_per_epoch = math.ceil(num_pairs / batch_size)
        self.total_steps = max_steps if max_steps is not None else self.steps_per_epoch * epochs

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.arange(self.num_pairs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def shard_for_rank(indices: list[int], rank: int, world: int, micro_batch_size: int,
                   micro_batches: int = 0) -> list[list[Optional[int]]]:
    """This process's micro-batches of one step. Every process gets the same number of micro-batches
    and rows; `None` rows (only in a short last step) are zero-weight fillers. With `micro_batches`,
    a short step is padded with one-row filler micro-batches to that many: accelerate (and DeepSpeed
    through it) counts micro-batches to decide when to update, so every step must have the same."""
    per_rank = math.ceil(len(indices) / world) if indices else 0
    mine: list[Optional[int]] = list(indices[rank::world])
    mine += [None] * (per_rank - len(mine))
    shards = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return shards + [[None]] * (micro_batches - len(shards))


def micro_batches_per_step(batch_size: int, world: int, micro_batch_size: int) -> int:
    return math.ceil(math.ceil(batch_size / world) / micro_batch_size)


class Trainer:
    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None, resume: bool = False, force: bool = False):
        self.recipe = recipe
        self.recipe_dir = Path(recipe_path).resolve().parent if recipe_path else None
        self.resume = resume
        self.force = force
        self.log = get_logger()
        self.output_dir = Path(recipe.run.output_dir)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Load the loss, models and data and prepare them with accelerate (once; `train` calls it)."""
        if getattr(self, "_is_set_up", False):
            return
        self._is_set_up = True
        r = self.recipe
        seed_everything(r.run.seed, r.run.num_threads, r.run.deterministic)
        self.loss = build_loss(r.loss, [self.recipe_dir] if self.recipe_dir else [])
        self.online = self.loss.data_kind == "groups"  # sampled groups (online RL) instead of offline pairs
        self.current_step = 0
        self.timings: dict[str, float] = {}
        self.accelerator = make_accelerator(1)
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        if not acc.is_main_process:
            self.log.setLevel("WARNING")  # one process reports
        if not self.resume and not self.force and acc.is_main_process and ckpt.latest_checkpoint(self.output_dir):
            raise PosttrainError(f"{self.output_dir} already holds checkpoints of an earlier run. Continue it with "
                                 f"--resume, choose another run.output_dir, or pass --force to start over there.")
        with acc.main_process_first():  # the alias's one-off conversion; the lock covers other launches
            resolve_model_path(r.model.name_or_path)
        # All processes load together: under ZeRO-3 loading is itself collective.
        self.tokenizer, self.policy, self.reference = load_policy_and_reference(r, self.loss.needs_reference)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_pairs: list[TokenizedPair] = []
        self.heldout_pairs: list[TokenizedPair] = []
        if self.online:
            online.setup_online(self)
            num_items = len(self.train_examples)
        else:
            self._setup_pairs()
            num_items = len(self.train_pairs)
        t = r.train
        self.plan = StepPlan(num_items, t.batch_size, t.epochs, r.run.seed, t.shuffle, t.max_steps)
        self.updates_per_step = r.rollout.updates_per_batch if self.online else 1
        self.n_micro = micro_batches_per_step(t.batch_size, self.world, t.micro_batch_size)
        acc.gradient_accumulation_steps = self.n_micro
        self._preflight()
        self.model = PolicyLogProbs(self.policy)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                          weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        from transformers import get_scheduler

        warmup = t.warmup_steps or int(round(t.warmup_ratio * self.plan.total_steps))
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup * self.updates_per_step,
                                       num_training_steps=self.plan.total_steps * self.updates_per_step)
        self._configure_deepspeed()
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.ref_model = None
        if self.reference.kind == "separate":
            self.ref_model = PolicyLogProbs(self.reference.model).to(acc.device)
        self.ref_cache: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._check_layout()
        if self.loss.needs_reference and r.reference.precompute:
            if self.online:
                raise RecipeError("reference.precompute works on a fixed set of pairs; an online run samples new "
                                  "completions every step. Set reference.precompute: false.")
            self.ref_cache = self._precompute_reference()
        if acc.is_main_process:
            write_run_record(self.output_dir, recipe_to_dict(r), r.run.seed, self.world)
        self.metrics = MetricsWriter(self.output_dir, r.logging.tensorboard, acc.is_main_process,
                                     append=self.resume)

    def _setup_pairs(self) -> None:
        """Tokenised training and held-out pairs of an offline run."""
        r = self.recipe
        skipped = self.output_dir / "skipped_rows.jsonl" if self.accelerator.is_main_process else None
        self.train_pairs, self.train_stats, _ = load_pairs(r.data.train, r.data, self.tokenizer, r.run.seed,
                                                           "data.train", skipped)
        if r.data.heldout is not None:
            self.heldout_pairs, _, _ = load_pairs(r.data.heldout, r.data, self.tokenizer, r.run.seed, "data.heldout",
                                                  skipped)
            if r.eval.max_pairs is not None:
                self.heldout_pairs = self.heldout_pairs[:r.eval.max_pairs]
        self.train_pairs = self.loss.prepare_pairs(self.train_pairs, self.tokenizer)
        if self.heldout_pairs:
            self.heldout_pairs = self.loss.prepare_pairs(self.heldout_pairs, self.tokenizer)

    def _configure_deepspeed(self) -> None:
        """Hand the recipe's batch geometry and clipping to DeepSpeed (no dataloader is prepared, so
        accelerate cannot infer them)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        t = self.recipe.train
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        config["gradient_accumulation_steps"] = self.n_micro
        config["train_batch_size"] = t.micro_batch_size * self.n_micro * self.world
        config["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm is not None else 0.0

    @property
    def peft_model(self):
        return self.accelerator.unwrap_model(self.model).model

    # ------------------------------------------------------------------ forward passes
    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe.train.bf16)

    def _reference_logps(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch.get("position_ids"))
        with torch.no_grad(), self._autocast():
            if self.ref_model is not None:
                return self.ref_model(*args, temperature=temperature)
            with self.reference.context(self.peft_model):
                return self.model(*args, temperature=temperature)

    def gathered_for_generation(self):
        """Generation samples the whole model on each process: under ZeRO-3 its parameters are gathered for the
        duration (a collective, so every process generates its share at its own pace without deadlocks);
        elsewhere a no-op. The gathering time is logged as time/gather_parameters."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return _timed(deepspeed.zero.GatheredParameters(list(self.peft_model.parameters()), modifier_rank=None),
                      self.timings, "time/gather_parameters")

    def _check_layout(self) -> None:
        """train.share_prompt and train.packing need a custom 4-D mask honoured exactly (choose_layout's test)."""
        t = self.recipe.train
        if not (t.share_prompt or t.packing):
            return
        if self.online:
            longest = max(len(p) for p in self.train_prompt_ids) + self.recipe.rollout.max_new_tokens
            supported = all(self.train_prompt_ids) and custom_mask_supported(self.model, longest)
        else:
            supported = choose_layout(self.model, self.train_pairs, "auto") == "shared"
        if not supported:
            raise RecipeError("train.share_prompt and train.packing need sdpa or eager attention "
                              "(model.attn_implementation), a non-empty prompt in every sequence and no sliding "
                              "window shorter than a sequence. Switch them off for this model or data.")

    def _rows(self, pairs: list[TokenizedPair]) -> PairRows:
        """The micro-batch's pairs in the recipe's row layout (posttrain.data.layout)."""
        t = self.recipe.train
        return build_pair_rows(pairs, self.pad_id, share_prompt=t.share_prompt,
                               pack_tokens=t.pack_tokens if t.packing else None,
                               attention=attention_kind(self.model), mask_dtype=model_dtype(self.model))

    def _row_length(self, pair: TokenizedPair) -> int:
        if self.recipe.train.share_prompt:
            return shared_length(pair)
        return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))

    def _precompute_reference(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token reference log-probs of every training pair, computed once (in the training layout, pairs
        sorted by length, `eval.batch_size` pairs per pass) and reused every epoch."""
        cache: list = [None] * len(self.train_pairs)
        bs = self.recipe.eval.batch_size
        order = sorted(range(len(self.train_pairs)), key=lambda i: self._row_length(self.train_pairs[i]))
        bar = tqdm(range(0, len(order), bs), desc="reference log-probs", disable=not self.accelerator.is_main_process)
        for start in bar:
            index = order[start:start + bs]
            rows = self._rows([self.train_pairs[i] for i in index])
            chosen, rejected = rows.split(self._reference_logps(rows.as_batch()))
            for j, i in enumerate(index):
                cache[i] = (chosen[j][rows.chosen_mask[j].bool()].clone(),
                            rejected[j][rows.rejected_mask[j].bool()].clone())
        return cache

    def _cached_reference(self, indices: list[Optional[int]], rows: PairRows,
                          like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached reference log-probs of the micro-batch's pairs, as [B, T] chosen and rejected tensors."""
        out = []
        for which, mask in ((0, rows.chosen_mask), (1, rows.rejected_mask)):
            values = torch.cat([self.ref_cache[i if i is not None else 0][which] for i in indices])
            out.append(like.new_zeros(mask.shape).masked_scatter(mask.bool(), values.to(like.dtype)))
        return out[0], out[1]

    # ------------------------------------------------------------------ one optimiser step
    def _normaliser(self, indices: list[int]) -> Normaliser:
        pairs = [self.train_pairs[i] for i in indices]
        chosen = sum(len(p.chosen_ids) for p in pairs)
        return Normaliser(sequences=float(len(pairs)), tokens=float(chosen + sum(len(p.rejected_ids) for p in pairs)),
                          chosen_tokens=float(chosen))

    def _loss_inputs(self, indices: list[Optional[int]], rows: PairRows, normaliser: Normaliser) -> PairLossInputs:
        """Policy (and, when the loss asks, reference) log-probs of one micro-batch, as typed loss inputs:
        [B, T] chosen and rejected tensors whatever the row layout."""
        batch = rows.as_batch()
        with self._autocast():
            logps = self.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["position_ids"])
        chosen, rejected = rows.split(logps)
        ref_w = ref_l = None
        if self.loss.needs_reference:
            if self.ref_cache is not None:
                ref_w, ref_l = self._cached_reference(indices, rows, logps)
            else:
                ref_w, ref_l = rows.split(self._reference_logps(batch).to(logps.dtype))
        dtype = logps.dtype
        weight = torch.tensor([0.0 if i is None else 1.0 for i in indices], dtype=dtype)
        tw_w = rows.chosen_weights.to(dtype) if rows.chosen_weights is not None else None
        tw_l = rows.rejected_weights.to(dtype) if rows.rejected_weights is not None else None
        return PairLossInputs(chosen_logps=chosen, rejected_logps=rejected, chosen_mask=rows.chosen_mask.to(dtype),
                              rejected_mask=rows.rejected_mask.to(dtype), normaliser=normaliser, pair_weight=weight,
                              ref_chosen_logps=ref_w, ref_rejected_logps=ref_l, chosen_token_weights=tw_w,
                              rejected_token_weights=tw_l)

    def train_step(self, step: int) -> dict:
        """One step: offline, forward/backward over this process's micro-batches of pairs, then one update; online,
        a rollout batch and its updates (posttrain.online). Returns the step's metrics, reduced over processes."""
        self.current_step = step
        return online.online_step(self, step) if self.online else self._pairs_step(step)

    def _pairs_step(self, step: int) -> dict:
        acc = self.accelerator
        indices = self.plan.indices(step)
        normaliser = self._normaliser(indices)
        scale = self.world * self.n_micro
        loss_sum, weight_sum, tokens = 0.0, 0.0, 0
        metric_sums: dict[str, float] = {}  # per-pair metrics, weighted by pair_weight
        part_sums: dict[str, float] = {}  # globally normalised loss components
        for rows in shard_for_rank(indices, self.rank, self.world, self.recipe.train.micro_batch_size, self.n_micro):
            pairs = [self.train_pairs[i if i is not None else 0] for i in rows]
            batch = self._rows(pairs)
            tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                          for p, i in zip(pairs, rows) if i is not None)
            with acc.accumulate(self.model), self._reporting_out_of_memory(step, rows, pairs):
                inputs = self._loss_inputs(rows, batch, normaliser)
                out = self.loss(inputs)
                acc.backward(out.loss * scale)
            weight = inputs.pair_weight.double()
            loss_sum += out.loss.item()
            weight_sum += weight.sum().item()
            for name, value in out.metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + (value.double() * weight).sum().item()
            for name, value in out.parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value.item()
        names, parts = sorted(metric_sums), sorted(part_sums)
        local = torch.tensor([loss_sum, weight_sum, float(tokens)] + [metric_sums[n] for n in names]
                             + [part_sums[n] for n in parts], dtype=torch.float64)
        total = acc.reduce(local.to(acc.device), reduction="sum").cpu() if self.world > 1 else local
        record = {"loss": total[0].item(), "num_tokens": total[2].item()}
        for k, name in enumerate(names):
            record[name] = total[3 + k].item() / max(total[1].item(), 1e-12)
        for k, name in enumerate(parts):
            record[name] = total[3 + len(names) + k].item()
        where = ", ".join(f"{self.train_pairs[i].source} row {self.train_pairs[i].row}" for i in indices[:4])
        record.update(self._finish_update(record["loss"], f"batch of {len(indices)} pairs: {where}"
                                                          f"{', ...' if len(indices) > 4 else ''}"))
        return record

    def _finish_update(self, loss: float, where: str) -> dict:
        """Clip, then take the optimiser and scheduler step, unless the loss or the gradient norm is not finite
        (then stop or skip, per train.on_nonfinite). Returns grad_norm, learning_rate (and skipped)."""
        grad_norm = self._clip_gradients()
        record = {"grad_norm": grad_norm, "learning_rate": self.scheduler.get_last_lr()[0]}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Every process sees the same reduced loss and global norm, so all decide alike.
            message = f"step {self.current_step + 1}: the loss is {loss} and the gradient norm {grad_norm} ({where})."
            if self.recipe.train.on_nonfinite == "stop":
                raise PosttrainError(message + " Stopping: lower train.lr, check those rows, or set "
                                               "train.on_nonfinite: skip to skip such steps.")
            if distributed.zero_stage(self.accelerator) is not None:
                raise PosttrainError(message + " Stopping although train.on_nonfinite is skip: under DeepSpeed "
                                               "the engine applies the update inside the last backward pass, so "
                                               "this step cannot be skipped. Lower train.lr or check those rows, "
                                               "and resume from the last checkpoint.")
            self.log.warning("%s Skipping the update (train.on_nonfinite: skip).", message)
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = 1.0
            return record
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.recipe.train.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[dict]:
        """Offline: held-out ranking accuracy and the rest of spec section 11 (R~, R*, alignment gap, difficulty,
        implicit-reward accuracy, length split), each process scoring an equal shard; the latest report
        goes to <output_dir>/eval/ (posttrain.eval.training). Online: greedy pass@1 on the held-out prompts."""
        return online.greedy_evaluation(self) if self.online else heldout_evaluation(self)

    def has_heldout(self) -> bool:
        return bool(self.heldout_examples if self.online else self.heldout_pairs)

    def score(self, pairs: list[TokenizedPair]) -> PairScores:
        """Summed log-probs of both responses of every pair under the current policy, each process
        scoring an equal shard."""
        return sharded_scores(self, pairs, self.model, choose_layout(self.model, pairs, self.recipe.eval.layout))

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self, step: int, history: dict) -> dict:
        state = {"step": step, "epoch": self.plan.epoch_of(step), "data_position": step,
                 "recipe": recipe_to_dict(self.recipe), "world_size": self.world, "history": history}
        if self.online:
            state["sampler"] = self.sampler.state_dict()
        return state

    def _gathered_trainable(self):
        """Under ZeRO-3 each process holds a shard of every parameter: gather the trainable ones (on
        every process, a collective) so that one process can write them whole."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save(self, step: int, history: dict, final: bool = False) -> None:
        """Checkpoint `step` (and `final/`), the same whatever the number of processes: every process
        takes part in gathering the trainable parameters and optimiser state, one writes them. Full
        fine-tuning under DeepSpeed instead writes DeepSpeed's own partitions, one per process."""
        acc = self.accelerator
        native = distributed.zero_stage(acc) is not None and not self.recipe.lora.enabled
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.prepare_staging(self.output_dir, step)
        acc.wait_for_everyone()
        if native:
            self.model.save_checkpoint(str(ckpt.staging_dir(self.output_dir, step) / "deepspeed"), tag="engine")
            training_state = ({}, distributed.native_checkpoint_meta(self))
        else:
            training_state = distributed.gather_training_state(self, with_parameters=self.recipe.lora.enabled)
        rngs = distributed.gather_objects(self, rng_state())
        acc.wait_for_everyone()
        with self._gathered_trainable():
            if acc.is_main_process:
                ckpt.save_checkpoint(self.output_dir, step, None if native else self.peft_model, training_state,
                                     self.scheduler, rngs, self._trainer_state(step, history),
                                     self.recipe.checkpoint.keep_last)
                if final:
                    ckpt.save_final(self.peft_model, self.tokenizer, self.output_dir)
        acc.wait_for_everyone()

    def _try_resume(self) -> tuple[int, dict]:
        path = ckpt.latest_checkpoint(self.output_dir)
        if path is None:
            self.log.warning("--resume: no complete checkpoint in %s; starting from step 0", self.output_dir)
            self.metrics.truncate_after(0)
            return 0, {}
        saved = json.loads((path / "trainer_state.json").read_text())
        differences = [key for key in _recipe_differences(saved["recipe"], recipe_to_dict(self.recipe))
                       if key != "run.output_dir"]  # a run directory moved or copied elsewhere resumes there
        if differences and not self.force:
            raise PosttrainError(f"cannot resume from {path}: the recipe differs from the checkpoint's in "
                                 f"{', '.join(differences)}. Restore those values, or pass --force to resume anyway.")
        tensors, meta, state = ckpt.read_checkpoint(path, self.scheduler, self.rank)
        if meta.get("deepspeed_native"):
            distributed.load_native_checkpoint(self, path, meta)
        else:
            distributed.restore_training_state(self, tensors, meta)
        if self.online:
            self.sampler.load_state_dict(state["sampler"])
        self.log.info("resumed from %s (step %d, written by %d process%s)", path, state["step"],
                      state.get("world_size", 1), "es" if state.get("world_size", 1) > 1 else "")
        self.metrics.truncate_after(state["step"])
        return state["step"], state.get("history", {})

    def _preflight(self) -> None:
        """Checks and test probes that run once, before the model is prepared and anything is written
        (posttrain.memory, posttrain.distributed)."""
        memory.check_micro_batch_memory(self)
        distributed.install_step_probe(self)

    @contextlib.contextmanager
    def _reporting_out_of_memory(self, step: int, rows: list[Optional[int]], pairs: list[TokenizedPair]):
        """An out-of-memory error in a micro-batch, reported with that batch's size and rows."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise PosttrainError(memory.out_of_memory_message(step, pairs, rows)) from None

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.setup()
        acc = self.accelerator
        r = self.recipe
        start, history = self._try_resume() if self.resume else (0, {})
        headline = "pass@1" if self.online else "ranking_accuracy"
        heldout_size = f"{len(self.heldout_examples)} prompts" if self.online else f"{len(self.heldout_pairs)} pairs"
        if start == 0 and r.eval.at_start and self.has_heldout():
            history["heldout_before"] = self.evaluate()
            self.metrics.write(0, history["heldout_before"], prefix="eval")
            self._say(f"held-out {headline.replace('_', ' ')} before training: "
                      f"{history['heldout_before'][headline]:.4f} ({heldout_size})")
        bar = tqdm(total=self.plan.total_steps, initial=start, desc="training",
                   disable=not (acc.is_main_process and r.logging.progress_bar))
        self.model.train()
        started = time.time()
        for step in range(start, self.plan.total_steps):
            t0 = time.time()
            self.timings: dict[str, float] = {}
            record = self.train_step(step)
            record.update(self.timings)
            elapsed = time.time() - t0
            record["tokens_per_second"] = record.pop("num_tokens") / max(elapsed, 1e-9)
            record["epoch"] = (step + 1) / self.plan.steps_per_epoch
            record["step_time"] = elapsed
            done = step + 1
            if done % r.logging.every == 0 or done == self.plan.total_steps:
                self.metrics.write(done, record)
            bar.update(1)
            if self.online:
                bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record.get('reward/mean', float('nan')):.3f}")
            else:
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                acc=f"{record.get('rewards/accuracies', float('nan')):.2f}")
            if r.eval.every and done % r.eval.every == 0 and done != self.plan.total_steps and self.has_heldout():
                self.current_step = done
                self.metrics.write(done, self.evaluate(), prefix="eval")
            from posttrain.eval.entanglement import entanglement_due, log_entanglement

            if not self.online and entanglement_due(r.eval, done):  # spec section 12, on preference pairs
                log_entanglement(self, done)
            if r.checkpoint.every and done % r.checkpoint.every == 0 and done != self.plan.total_steps:
                self.save(done, history)
        bar.close()
        train_time = time.time() - started
        self.current_step = self.plan.total_steps
        if r.eval.at_end and self.has_heldout():
            history["heldout_after"] = self.evaluate()
            self.metrics.write(self.plan.total_steps, history["heldout_after"], prefix="eval")
        self.save(self.plan.total_steps, history, final=True)
        summary = {"steps": self.plan.total_steps, "train_seconds": train_time, **history}
        if acc.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            before, after = history.get("heldout_before"), history.get("heldout_after")
            if after:
                name = headline.replace("_", " ")
                line = f"held-out {name} after training: {after[headline]:.4f}"
                if before:
                    delta = 100 * (after[headline] - before[headline])
                    line = (f"held-out {name}: {before[headline]:.4f} before -> {after[headline]:.4f} after "
                            f"({delta:+.1f} points, {heldout_size})")
                self._say(line)
        self.metrics.close()
        if self.online:
            self.rewards.close()
        acc.wait_for_everyone()
        return summary

    def _say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[posttrain] {text}")


def _recipe_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUME_FREE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _recipe_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


@contextlib.contextmanager
def _timed(context, timings: dict, name: str):
    """Enter `context`, adding the seconds its entry took to timings[name]."""
    t0 = time.time()
    with context:
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        yield
