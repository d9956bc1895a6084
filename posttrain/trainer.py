"""The one trainer: set-up, the loop, evaluation and checkpoints around one of two steps.

`setup` builds the loss, models, data and optimiser, prepares them with accelerate and hands a small
`StepContext` to the step the loss trains on: `PairStep` (offline pairs, posttrain/steps/pairs.py) or
`GroupStep` (online groups, posttrain/steps/groups.py). `train` runs the step `plan.total_steps` times,
with held-out evaluation, checkpoints and the recipe's callbacks in between. The trainer asks the loss
what it needs (`needs_reference`, `data_kind`) and never names a loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from posttrain import checkpoint as ckpt
from posttrain.callbacks import StepEnd, build_callbacks
from posttrain.checkpoint_state import (TrainingState, follow_current_schedule, gather_objects, gather_training_state,
                                        load_native_checkpoint, named_trainable, native_checkpoint_meta,
                                        restore_training_state)
from posttrain.config import Recipe, recipe_to_dict
from posttrain.core import PolicyLogProbs
from posttrain.core.logprobs import check_against_forward
from posttrain.core.segments import attends_by_segment
from posttrain.data.layout import packing_pays, shared_length
from posttrain.errors import ModelError, PosttrainError, RecipeError
from posttrain.eval.entanglement import EntanglementDiagnostic, entanglement_due
from posttrain.eval.generation import greedy_evaluation
from posttrain.eval.ranking import attention_kind, choose_layout, custom_mask_supported
from posttrain.eval.training import HeldoutRanking
from posttrain.logs import MetricsWriter, get_logger
from posttrain.losses import build_loss
from posttrain.memory import check_micro_batch_memory
from posttrain.models import adapter_base_model, load_policy_and_reference, load_tokenizer, resolve_model_path
from posttrain.plan import StepPlan, micro_batches_per_step
from posttrain.rewards import build_reward_set
from posttrain.rollout import EngineContext
from posttrain.runtime import make_accelerator, rng_state, seed_everything, write_run_record
from posttrain.samplers import build_sampler
from posttrain.steps import online_setup
from posttrain.steps.common import OptimiserStep, StepContext
from posttrain.steps.groups import GroupStep
from posttrain.steps.pairs import PairStep
from posttrain.steps.run_data import load_run_data
from posttrain.zero import gathered, timed, zero_stage

# Recipe sections that may change between a checkpoint and its resume without --force.
RESUME_FREE_KEYS = {"logging", "eval", "checkpoint"}


class Trainer:
    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None, resume: bool = False, force: bool = False):
        self.recipe = recipe
        self.search_dirs = [Path(recipe_path).resolve().parent] if recipe_path else []
        self.resume, self.force = resume, force
        self.log = get_logger()
        self.output_dir = Path(recipe.run.output_dir)
        self.is_set_up = False
        self.tokens_seen = 0.0  # TRL's num_tokens: restored on resume

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Load the loss, models and data, prepare them with accelerate and build the step (once)."""
        if self.is_set_up:
            return
        self.is_set_up = True
        r, t = self.recipe, self.recipe.train
        seed_everything(r.run.seed, r.run.num_threads, r.run.deterministic)
        self.loss = build_loss(r.loss, self.search_dirs)
        self.online = self.loss.data_kind == "groups"  # sampled groups (online RL) instead of offline pairs
        if self.online:
            self.loss.use_estimator(r.rollout.advantage_estimator)
        self.callbacks = build_callbacks(r.run.callbacks, self.search_dirs)
        self.accelerator = acc = make_accelerator(1)
        self.world, self.rank = acc.num_processes, acc.process_index
        if not acc.is_main_process:
            self.log.setLevel("WARNING")  # one process reports
        if not self.resume and not self.force and acc.is_main_process and ckpt.latest_checkpoint(self.output_dir):
            raise PosttrainError(f"{self.output_dir} already holds checkpoints of an earlier run. Continue it with "
                                 f"--resume, choose another run.output_dir, or pass --force to start over there.")
        with acc.main_process_first():  # the alias's one-off conversion; the lock covers other launches
            resolve_model_path(r.model.name_or_path)
        self.tokenizer = load_tokenizer(r.model.name_or_path, r.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        skipped = self.output_dir / "skipped_rows.jsonl" if acc.is_main_process else None
        data = load_run_data(r, self.loss, self.tokenizer, self.search_dirs, skipped)  # before any model loads
        self.train_pairs, self.heldout_pairs = data.train_pairs, data.heldout_pairs
        self.train_examples, self.heldout_examples = data.train_examples, data.heldout_examples
        self.train_prompt_ids, self.heldout_prompt_ids = data.train_prompt_ids, data.heldout_prompt_ids
        items = data.train_items
        # All processes load together: under ZeRO-3 loading is itself collective.
        self.policy, self.reference = load_policy_and_reference(r, self.loss.needs_reference)
        logprobs = PolicyLogProbs(self.policy)
        probe_device = torch.device("cpu")  # before prepare: the weights are still on the host
        try:
            with gathered(list(self.policy.parameters()), zero_stage(acc)), \
                    torch.autocast(probe_device.type, dtype=torch.bfloat16, enabled=r.autocast_bf16):
                check_against_forward(logprobs, probe_device)
        except ValueError as exc:
            raise ModelError(f"model {r.model.name_or_path!r} cannot be trained by posttrain: {exc}.") from None
        self.plan = StepPlan(len(items), t.batch_size, t.epochs, r.run.seed, t.shuffle, t.max_steps)
        self.n_micro = micro_batches_per_step(t.batch_size, self.world, t.micro_batch_size)
        acc.gradient_accumulation_steps = self.n_micro
        if not self.online:
            check_micro_batch_memory(r, self.train_pairs, self.plan, self.world, self.n_micro, acc.device)
        updates = r.rollout.updates_per_batch if self.online else 1
        params = [p for p in logprobs.parameters() if p.requires_grad]
        if t.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                          weight_decay=t.weight_decay, fused=acc.device.type == "cuda" or None)
        else:
            optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        warmup = t.warmup_steps or int(round(t.warmup_ratio * self.plan.total_steps))
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup * updates,
                                       num_training_steps=self.plan.total_steps * updates)
        self._configure_deepspeed()
        self.model, self.optimizer = acc.prepare(logprobs, optimizer)
        self.reference.place(acc.device)
        share_prompt, packing = self._resolve_layout()
        self.context = StepContext(
            accelerator=acc, model=self.model, peft_model=lambda: acc.unwrap_model(self.model).model,
            reference=self.reference, bf16=r.autocast_bf16, pad_id=self.pad_id, micro_batch_size=t.micro_batch_size,
            n_micro=self.n_micro, share_prompt=share_prompt, pack_tokens=t.pack_tokens if packing else None,
            log=self.log, optimiser_step=OptimiserStep(acc, self.model, self.optimizer, self.scheduler,
                                                       t.max_grad_norm, t.on_nonfinite))
        self.metrics = MetricsWriter(self.output_dir, r.logging, acc.is_main_process, append=self.resume,
                                     config=recipe_to_dict(r))
        self.step = self._build_step()
        self.training_state = TrainingState(acc, self.model, self.context.peft_model(), self.optimizer,
                                            self.scheduler, self.output_dir)
        if acc.is_main_process:
            write_run_record(self.output_dir, recipe_to_dict(r), r.run.seed, self.world)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        unit = "prompts" if self.online else "pairs"
        self._say(f"{self.world} process{'es' if self.world > 1 else ''} (backend {backend}, distributed type "
                  f"{acc.distributed_type.value}, device {acc.device}); {self.plan.total_steps} steps of "
                  f"{t.batch_size} {unit}, {self.n_micro} micro-batch{'es' if self.n_micro > 1 else ''} of up to "
                  f"{t.micro_batch_size} per process per step; outputs in {self.output_dir.resolve()}")

    def _build_step(self):
        r, acc, ctx = self.recipe, self.accelerator, self.context
        if not self.online:
            self.evaluation = HeldoutRanking(acc, self.model, ctx.peft_model, self.reference, self.heldout_pairs,
                                             self.pad_id, r, self.loss, self.tokenizer, self.output_dir)
            self.entanglement = EntanglementDiagnostic(acc, self.model, (self.heldout_pairs or self.train_pairs)
                                                       [:r.eval.entanglement_pairs], self.pad_id, r.autocast_bf16,
                                                       self.metrics, self.log)
            return PairStep(ctx, self.loss, self.train_pairs, self.plan, self._resolve_precompute(), r.eval.batch_size)
        self.rewards = build_reward_set(r.rewards, num_workers=r.rollout.reward_workers,
                                        timeout_s=r.rollout.reward_timeout, search_dirs=self.search_dirs)
        component = r.sampler.success_component or r.rewards[0].name
        if component not in self.rewards.names:
            raise RecipeError(f"sampler.success_component {component!r} is not a reward component; the rewards give "
                              f"{', '.join(self.rewards.names)}.")
        sampler = build_sampler(r.sampler.name, len(self.train_examples), r.run.seed, self.search_dirs,
                                **r.sampler.params)
        stage = zero_stage(acc)
        if stage == 3 and r.rollout.max_staleness:
            raise RecipeError("rollout.max_staleness 1 is not available under DeepSpeed ZeRO-3 yet (the trainable "
                              "weights of the version that sampled are kept whole on each process); use ZeRO-2 or "
                              "set rollout.max_staleness: 0.")
        self.engine = engine = online_setup.build_engine(r.rollout.engine, EngineContext(
            policy=ctx.peft_model, tokenizer=self.tokenizer, pad_id=self.pad_id,
            stop_ids=online_setup.stop_token_ids(self.tokenizer), rollout=r.rollout,
            gather=lambda: timed(gathered(ctx.peft_model().parameters(), stage), ctx.timings, "time/gather_parameters"),
            autocast=ctx.autocast, current_step=lambda: self.current_step, model_name=r.model.name_or_path,
            model_path=resolve_model_path(r.model.name_or_path), dtype=r.model.dtype,
            lora_rank=r.lora.r if r.lora.enabled else None, seed=r.run.seed,
            work_dir=self.output_dir / "rollout-engine" / f"rank{self.rank}",
            max_model_len=r.data.max_length + r.rollout.max_new_tokens, rank=self.rank), self.search_dirs)
        collector = lambda examples, ids, truncated, reward: online_setup.build_collector(  # noqa: E731
            engine, self.rewards, examples, ids, self.tokenizer, component, r.sampler.success_threshold, truncated,
            reward, self.world, self.rank)
        self.heldout_collector = collector(self.heldout_examples, self.heldout_prompt_ids, "keep", 0.0)
        completions = self.output_dir / "completions.jsonl" if r.logging.completions and acc.is_main_process else None
        if completions is not None and not self.resume:
            completions.unlink(missing_ok=True)
        return GroupStep(ctx, self.loss, sampler, collector(self.train_examples, self.train_prompt_ids,
                                                            r.rollout.truncated, r.rollout.truncated_reward),
                         r.rollout, r.train.batch_size, online_setup.sampling_params(r.rollout),
                         self.plan.total_steps, completions)

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

    def _resolve_layout(self) -> tuple[bool, bool]:
        """(share_prompt, packing) for this run. `auto` (the default) turns the shared prompt on, and packing for
        offline pairs, where the model honours a custom 4-D mask exactly (sdpa or eager attention, a non-empty
        prompt in every sequence, no sliding window shorter than a sequence: choose_layout's test); online groups
        of equal-length completions gain nothing from packing (docs/performance.md), so `auto` leaves it off
        there. An explicit true the model or data cannot honour is refused."""
        t = self.recipe.train
        if self.online:
            longest = max(len(p) for p in self.train_prompt_ids) + self.recipe.rollout.max_new_tokens
            supported = all(self.train_prompt_ids) and custom_mask_supported(self.model, longest)
        else:
            supported = choose_layout(self.model, self.train_pairs, "auto") == "shared"
        if not supported and True in (t.share_prompt, t.packing):
            raise RecipeError("train.share_prompt and train.packing need sdpa or eager attention "
                              "(model.attn_implementation), a non-empty prompt in every sequence and no sliding "
                              "window shorter than a sequence. Switch them off (or to auto) for this model or data.")
        share_prompt = supported if t.share_prompt == "auto" else t.share_prompt
        packing, packing_why = t.packing, ""
        if t.packing == "auto":
            packing = supported and not self.online and self._packing_pays(share_prompt)
            packing_why = ("; packing off for online groups" if self.online else
                           f"; packing {'pays' if packing else 'does not pay'} for these lengths") if supported else ""
        if "auto" in (t.share_prompt, t.packing):
            why = (f"{attention_kind(self.model)} attention honours the custom mask" if supported else
                   "this model or data cannot use a custom mask")
            self._say(f"row layout: shared prompt {'on' if share_prompt else 'off'}, packing "
                      f"{'on' if packing else 'off'} (train.share_prompt / train.packing auto: {why}{packing_why})")
        return share_prompt, packing

    def _resolve_precompute(self) -> bool:
        """Whether to compute the reference log-probs of every training pair once before training. Each process
        precomputes all pairs, in length-sorted batches of `eval.batch_size`; live, it scores its share of each
        step's pairs. `auto` (the default) precomputes where the plan visits at least as many pairs per process
        as there are pairs: a full epoch on one process, or several epochs on several."""
        choice = self.recipe.reference.precompute
        if choice != "auto" or not self.loss.needs_reference:
            return bool(choice) and self.loss.needs_reference
        visits = self.plan.visits() / self.world
        precompute = visits >= len(self.train_pairs)
        self._say(f"reference log-probs {'precomputed once' if precompute else 'computed live'} (reference.precompute "
                  f"auto: {visits:g} pair visits per process, {len(self.train_pairs)} training pairs)")
        return precompute

    def _packing_pays(self, share_prompt: bool, batches: int = 64) -> bool:
        """posttrain.data.layout.packing_pays on the first micro-batches of training pairs, in the chosen layout
        (a shared segment per pair, or its two sequences), attention by segment where the model runs it so."""
        text = self.policy.config.get_text_config()
        heads = text.num_attention_heads
        attention_width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
        weights = sum(getattr(p, "ds_numel", p.numel()) for p in self.policy.parameters())  # ZeRO-3: whole sizes
        size = self.recipe.train.micro_batch_size
        pairs = self.train_pairs[:batches * size]
        segments = [[shared_length(p) for p in pairs[i:i + size]] if share_prompt else
                    [len(p.prompt_ids) + len(y) for p in pairs[i:i + size] for y in (p.chosen_ids, p.rejected_ids)]
                    for i in range(0, len(pairs), size)]
        return packing_pays(segments, self.recipe.train.pack_tokens, weights, text.num_hidden_layers, attention_width,
                            by_segment=attends_by_segment(self.policy))

    @property
    def peft_model(self):
        return self.context.peft_model()

    # ------------------------------------------------------------------ one step, evaluation
    def train_step(self, step: int) -> dict:
        """One optimiser step (offline) or one rollout batch and its updates (online); the step's metrics, reduced
        over processes. The recipe's callbacks see it (`on_step_end`)."""
        self.current_step = step
        record = self.step.run(step)
        if self.callbacks:
            event = StepEnd(step + 1, record, self.rank, self.world, getattr(self.step, "last_rows", None),
                            named_trainable(self.peft_model),
                            lambda: gathered([p for _, p in named_trainable(self.peft_model)], zero_stage(self.accelerator)))
            for callback in self.callbacks:
                callback.on_step_end(event)
        return record

    def evaluate(self) -> Optional[dict]:
        """Offline: held-out ranking accuracy and the rest of spec section 11 (posttrain.eval.training). Online:
        greedy pass@1 on the held-out prompts (posttrain.eval.generation)."""
        step = int(getattr(self.scheduler, "last_epoch", 0)) if not self.online else self.current_step
        if self.online:
            self.step.settle()
            return greedy_evaluation(self.heldout_collector, self.heldout_examples,
                                     online_setup.sampling_params(self.recipe.rollout, greedy=True), self.output_dir,
                                     step, self.accelerator.is_main_process and self.recipe.eval.report)
        return self.evaluation(step)

    def score(self, pairs: list):
        """Summed log-probs of both responses of every pair under the current policy (each process an equal shard)."""
        return self.evaluation.scores_of(pairs)

    def has_heldout(self) -> bool:
        return bool(self.heldout_examples if self.online else self.heldout_pairs)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, history: dict, final: bool = False) -> None:
        """Checkpoint `step` (and `final/`), the same whatever the number of processes: every process
        takes part in gathering the trainable parameters and optimiser state, one writes them. Full
        fine-tuning under DeepSpeed instead writes DeepSpeed's own partitions, one per process."""
        acc, state = self.accelerator, self.training_state
        native = zero_stage(acc) is not None and not self.recipe.lora.enabled
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.prepare_staging(self.output_dir, step)
        acc.wait_for_everyone()
        if native:
            self.model.save_checkpoint(str(ckpt.staging_dir(self.output_dir, step) / "deepspeed"), tag="engine")
            training_state = ({}, native_checkpoint_meta(state))
        else:
            training_state = gather_training_state(state, with_parameters=self.recipe.lora.enabled)
        rngs = gather_objects(self.world, rng_state())
        trainer_state = {"step": step, "epoch": self.plan.epoch_of(step), "data_position": step,
                         "recipe": recipe_to_dict(self.recipe), "world_size": self.world, "history": history,
                         "num_tokens": self.tokens_seen}
        if self.online:
            trainer_state["sampler"] = self.step.sampler.state_dict()
        acc.wait_for_everyone()
        with gathered([p for _, p in named_trainable(self.peft_model)], zero_stage(acc)):
            if acc.is_main_process:
                ckpt.save_checkpoint(self.output_dir, step, None if native else self.peft_model, training_state,
                                     self.scheduler, rngs, trainer_state, self.recipe.checkpoint.keep_last,
                                     self.callbacks)
                if final:
                    ckpt.save_final(self.peft_model, self.tokenizer, self.output_dir,
                                    *adapter_base_model(self.recipe.model.name_or_path, self.recipe.lora.adapter_base))
        acc.wait_for_everyone()

    def _try_resume(self) -> tuple[int, dict]:
        path = ckpt.latest_checkpoint(self.output_dir)
        if path is None:
            self.log.warning("--resume: no complete checkpoint in %s; starting from step 0", self.output_dir)
            self.metrics.truncate_after(0)
            return 0, {}
        saved = json.loads((path / "trainer_state.json").read_text())
        differences = [(key, old, new) for key, old, new in
                       _recipe_differences(saved["recipe"], recipe_to_dict(self.recipe))
                       if key != "run.output_dir"]  # a run directory moved or copied elsewhere resumes there
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences)
        if differences and not self.force:
            raise PosttrainError(f"cannot resume from {path}: the recipe differs from the checkpoint's ({listed}). "
                                 f"Restore those values, or pass --force to resume anyway.")
        if differences:
            self.log.warning("--force: resuming with a changed recipe (%s)", listed)
        tensors, meta, state = ckpt.read_checkpoint(path, self.scheduler, self.rank)
        if meta.get("deepspeed_native"):
            load_native_checkpoint(self.training_state, path, meta)
        else:
            restore_training_state(self.training_state, tensors, meta)
        follow_current_schedule(self.scheduler, self.recipe.train.lr)
        if differences:
            self.log.warning("learning-rate schedule rebuilt for %d steps: %.6g at step %d",
                             self.plan.total_steps, self.scheduler.get_last_lr()[0], state["step"])
        if self.online:
            self.step.sampler.load_state_dict(state["sampler"])
        self.log.info("resumed from %s (step %d, written by %d process%s)", path, state["step"],
                      state.get("world_size", 1), "es" if state.get("world_size", 1) > 1 else "")
        self.metrics.truncate_after(state["step"])
        self.tokens_seen = state.get("num_tokens", 0.0)
        return state["step"], state.get("history", {})

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self.setup()
        acc, r = self.accelerator, self.recipe
        self.tokens_seen = 0.0
        start, history = self._try_resume() if self.resume else (0, {})
        tokens_before = self.tokens_seen
        headline = "pass@1" if self.online else "ranking_accuracy"
        heldout_size = f"{len(self.heldout_examples)} prompts" if self.online else f"{len(self.heldout_pairs)} pairs"
        self.current_step = start
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
            self.context.timings.clear()
            record = self.train_step(step)
            record.update(self.context.timings)
            elapsed = time.time() - t0
            tokens = record.pop("num_tokens")
            self.tokens_seen += tokens
            record["tokens_per_second"] = tokens / max(elapsed, 1e-9)
            record["num_tokens"] = self.tokens_seen  # TRL's name: the tokens processed so far
            record["epoch"] = (step + 1) / self.plan.steps_per_epoch
            record["step_time"] = elapsed
            done = step + 1
            if done % r.logging.every == 0 or done == self.plan.total_steps:
                self.metrics.write(done, record)
            bar.update(1)
            shown = ("reward", record.get("reward/mean", float("nan"))) if self.online else \
                ("acc", record.get("rewards/accuracies", float("nan")))
            bar.set_postfix(loss=f"{record['loss']:.4f}", **{shown[0]: f"{shown[1]:.3f}"})
            self.current_step = done
            if r.eval.every and done % r.eval.every == 0 and done != self.plan.total_steps and self.has_heldout():
                self.metrics.write(done, self.evaluate(), prefix="eval")
            if not self.online and entanglement_due(r.eval, done):  # spec section 12, on preference pairs
                self.entanglement(done)
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
            self._say(f"final {'adapter' if r.lora.enabled else 'model'}: {(self.output_dir / 'final').resolve()}")
            tqdm.write(run_summary_table(self.plan.total_steps - start, train_time, self.tokens_seen - tokens_before,
                                         headline,
                                         before, after))
        self.metrics.close()
        if self.online:
            self.step.close()
            self.rewards.close()
            self.engine.close()
        acc.wait_for_everyone()
        return summary

    def _say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[posttrain] {text}")


def run_summary_table(steps: int, seconds: float, tokens: float, headline: str, before: Optional[dict],
                      after: Optional[dict]) -> str:
    """The table printed at the end of a run: steps, time, throughput and the held-out headline metric."""
    minutes, rest = divmod(int(round(seconds)), 60)
    value = lambda record: f"{record[headline]:.4f}" if record else "-"  # noqa: E731
    rows = [("steps", "time", "tokens/s", f"held-out {headline.replace('_', ' ')} before", "after"),
            (str(steps), f"{minutes}m{rest:02d}s", f"{tokens / max(seconds, 1e-9):.0f}", value(before), value(after))]
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _recipe_differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint's value, current value) for every recipe value that changed."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUME_FREE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _recipe_differences(a, b, path + ".")
        elif a != b:
            changed.append((path, a, b))
    return changed
