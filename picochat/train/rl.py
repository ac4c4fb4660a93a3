"""`picochat rl`: reinforcement learning on math from the run's SFT checkpoint (stage "rl").

On-policy policy gradient, as the system picochat follows does it on GSM8K, without a value model:
per step, each of `prompts_per_step` training prompts gets `samples_per_prompt` completions sampled
by the inference core (calculator tool on), each scored by the task's checker; a sample's advantage
is its reward minus its prompt group's mean (optionally over the group's std), and the loss is
-Σ advantage · log p(token) over the tokens the policy sampled (prompt and tool outputs masked),
divided by the step's sampled-token count (`rl_loss.py`). No KL term unless `--kl-coef` is set.

The optimizers are the other stages' (`optim.build_optimizers`), every LR scaled by `--lr-frac` and
decaying linearly to zero over the run. After each update the new weights are copied into the
rollout scheduler's model in place (its cache and captured graphs stay). Under torchrun each rank samples its share of the step's prompts and DDP
all-reduces the gradients, every rank running the same number of micro-batches.

Held-out evaluation (pass@1 and pass@k, k = `--eval-samples`) runs before the first step, every
`--eval-every` steps and after the last; logs go to `logs/train_rl.jsonl` and `logs/val_rl.jsonl`,
the summary to `results/rl.json`. Checkpoints resume exactly: a step's prompts and sampling seeds
are functions of (seed, step), and weights, optimizer and RNG states are saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import runs
from ..common import autocast, detect_device, init_distributed, log, seed_everything, synchronize
from ..config import ModelConfig, RLConfig
from ..runs import RunPaths
from . import checkpoint as ckpt
from .optim import build_optimizers, lr_multiplier, set_lr
from .preemption import StopSignals, stopped_after_save
from .rl_loss import collate, group_advantages, policy_loss, sampled_token_count, target_logprobs, token_rows
from .rl_rollout import Group, request_seed, score

STAGE = "rl"


def build_tasks(cfg: RLConfig) -> tuple:
    """(training task, held-out evaluation task)."""
    if cfg.task == "arithmetic":
        from ..data.tasks.synthetic import ArithmeticTask

        return (ArithmeticTask("train", size=cfg.train_size, seed=cfg.seed),
                ArithmeticTask("test", size=max(1, cfg.eval_prompts), seed=cfg.seed))
    from ..data.tasks.gsm8k import GSM8K

    return GSM8K("train", source=cfg.gsm8k), GSM8K("test", source=cfg.gsm8k_test)


def step_prompt_indices(step: int, prompts: int, task_size: int, seed: int) -> list[int]:
    """The task indices of step `step`'s prompts: consecutive slices of a per-epoch shuffle."""
    out = []
    for g in range(step * prompts, (step + 1) * prompts):
        epoch, pos = divmod(g, task_size)
        order = torch.randperm(task_size, generator=torch.Generator().manual_seed(request_seed(seed, "epoch", epoch)))
        out.append(int(order[pos]))
    return out


def _all_reduce(values: list[float], device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class RLTrainer:
    def __init__(self, cfg: RLConfig, on_step=None, tasks: tuple | None = None):
        """`tasks`: (training task, held-out task) to use instead of `cfg.task`'s: any `Task` whose
        conversations end with a checkable answer (its `evaluate`, or a scalar `reward`)."""
        self.cfg, self.on_step, self.tasks = cfg, on_step, tasks
        self.paths = RunPaths.for_run(cfg.run)
        self.stage_dir = self.paths.stage(STAGE)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        from ..model.gpt import build_model
        cfg = self.cfg
        self.device = detect_device(cfg.device)
        self.dist = init_distributed(self.device)
        if cfg.prompts_per_step % self.dist.world_size:
            raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over "
                             f"{self.dist.world_size} ranks")
        seed_everything(cfg.seed + self.dist.rank)
        self.start = self._start_checkpoint()
        self.tokenizer = runs.load_tokenizer(cfg.run)
        self.model_cfg = ModelConfig.from_dict(runs.read_meta(self.start)["model"])
        self.model = build_model(self.model_cfg, self.device)
        runs.load_weights(self.start, self.model)
        optim = replace(cfg.optim, warmup_frac=0.0, warmdown_frac=1.0, final_lr_frac=0.0)
        scaled = replace(optim, **{k: getattr(optim, k) * cfg.lr_frac
                                   for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")})
        self.optim_cfg = scaled
        self.optimizers = build_optimizers(self.model, scaled, self.device)
        self.ddp = None
        if self.dist.is_distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = build_model(self.model_cfg, self.device)
            runs.load_weights(self.start, self.reference)
            self.reference.eval().requires_grad_(False)
        self.train_task, self.eval_task = self.tasks or build_tasks(cfg)
        if len(self.train_task) == 0:
            raise ValueError(f"the {cfg.task} training set is empty")
        self.rollouts = self._make_rollouts()

    def _make_rollouts(self):
        from .rl_rollout import SchedulerRollouts

        cfg = self.cfg
        if cfg.eager_rollouts:  # the baseline: one prompt's samples at a time
            return SchedulerRollouts(self.model, self.tokenizer, max(cfg.samples_per_prompt, cfg.eval_samples),
                                     eager=True)
        local_prompts = cfg.prompts_per_step // self.dist.world_size
        return SchedulerRollouts(self.model, self.tokenizer,
                                 local_prompts * max(cfg.samples_per_prompt, cfg.eval_samples))

    def _start_checkpoint(self) -> Path:
        for stage in runs.stage_info(STAGE).starts_from:
            found = runs.latest_checkpoint(self.paths.stage(stage))
            if found is not None:
                return found
        raise FileNotFoundError(f"rl needs an SFT checkpoint in run {self.cfg.run!r} (under {self.paths.root}); "
                                f"run `picochat sft --run {self.cfg.run}` first")

    def num_steps(self) -> int:
        if self.cfg.num_steps >= 0:
            return self.cfg.num_steps
        return max(1, len(self.train_task) // self.cfg.prompts_per_step)

    # -- rollouts ------------------------------------------------------------------------------
    def _max_tokens(self, prompts: list[list[int]]) -> int:
        room = self.model_cfg.seq_len - max(len(p) for p in prompts)
        if room < 1:
            raise ValueError(f"a {self.cfg.task} prompt of {max(len(p) for p in prompts)} tokens fills the model's "
                             f"context of {self.model_cfg.seq_len}")
        return min(self.cfg.max_new_tokens, room)

    def sample_groups(self, task, indices: list[int], n: int, temperature: float, seed_parts: tuple
                      ) -> list[Group]:
        """n scored samples for each of the task's `indices` (this rank's share)."""
        convs = [task[i] for i in indices]
        prompts = [self.tokenizer.render_for_completion(task.prompt(c)) for c in convs]
        seeds = [request_seed(*seed_parts, i) for i in indices]
        self.model.eval()
        samples = self.rollouts.generate(prompts, n, self._max_tokens(prompts), temperature, self.cfg.top_k, seeds)
        self.model.train()
        groups = []
        for i, conv, prompt, group in zip(indices, convs, prompts, samples):
            for s in group:
                s.reward = score(task, conv, s.tokens, self.tokenizer)
            groups.append(Group(i, prompt, group))
        return groups

    def local_indices(self, step: int) -> list[int]:
        cfg, W, r = self.cfg, self.dist.world_size, self.dist.rank
        indices = step_prompt_indices(step, cfg.prompts_per_step, len(self.train_task), cfg.seed)
        share = cfg.prompts_per_step // W
        return indices[r * share:(r + 1) * share]

    # -- the update ----------------------------------------------------------------------------
    def update(self, step: int, num_steps: int, groups: list[Group]) -> dict:
        """One optimizer step on this rank's groups (gradients all-reduced over ranks)."""
        cfg, device, world = self.cfg, self.device, self.dist.world_size
        lr_mult = set_lr(self.optimizers, lr_multiplier(step, num_steps, self.optim_cfg))
        rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
        adv = group_advantages(rewards, cfg.std_normalize)
        rows = [token_rows(g.prompt, s.tokens, s.sampled, float(adv[i, j]))
                for i, g in enumerate(groups) for j, s in enumerate(g.samples)]
        micro = [collate(rows[k:k + cfg.device_batch_size]) for k in range(0, len(rows), cfg.device_batch_size)]
        local_tokens = float(sum(int(sampled_token_count(m)) for m in micro))
        n_tokens = max(1.0, _all_reduce([local_tokens], device)[0])
        wrapped = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), device=device)
        kl_sum = torch.zeros((), device=device)
        for i, m in enumerate(micro):
            x, y, w = (m[k].to(device) for k in ("inputs", "targets", "weights"))
            sync = self.ddp is None or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), autocast(device):
                logp = target_logprobs(wrapped, x, y, cfg.temperature)
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = target_logprobs(self.reference, x, y, cfg.temperature)
                loss, kl = policy_loss(logp, y, w, n_tokens, ref, cfg.kl_coef)
            (loss * world).backward()  # DDP averages over ranks; the loss is already over all ranks' tokens
            loss_sum += loss.detach().float()
            kl_sum += kl.float()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        flat = rewards.flatten()
        sums = _all_reduce([loss_sum.item(), kl_sum.item(), flat.sum().item(), flat.numel(),
                            sum(len(s.tokens) for g in groups for s in g.samples),
                            float((rewards.std(dim=1) > 0).sum())], device)
        if not math.isfinite(sums[0]):
            raise RuntimeError(f"rl: the loss became {sums[0]} at step {step}; last good checkpoint: "
                               f"{runs.latest_checkpoint(self.stage_dir) or 'none'}")
        return {"loss": sums[0], "kl": sums[1], "reward": sums[2] / sums[3], "completion_tokens": int(sums[4]),
                "sampled_tokens": int(n_tokens), "groups_with_signal": int(sums[5]), "lr_mult": lr_mult}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """pass@1 (mean fraction of correct samples) and pass@k (any of k correct) on held-out prompts."""
        cfg, W, r = self.cfg, self.dist.world_size, self.dist.rank
        n_eval = min(cfg.eval_prompts, len(self.eval_task))
        mine = [i for i in range(n_eval) if i % W == r]
        correct = solved = total = 0.0
        if mine:  # all at once: the scheduler queues what does not fit in its slots
            for g in self.sample_groups(self.eval_task, mine, cfg.eval_samples, cfg.eval_temperature,
                                        (cfg.seed, "eval")):
                hits = sum(s.reward > 0 for s in g.samples)
                correct += hits / len(g.samples)
                solved += hits > 0
                total += 1
        correct, solved, total = _all_reduce([correct, solved, total], self.device)
        result = {"step": step, "prompts": int(total), "samples": cfg.eval_samples,
                  "pass@1": correct / max(1, total), f"pass@{cfg.eval_samples}": solved / max(1, total)}
        if self.dist.is_main:
            log.info(f"rl eval @{step}: pass@1 {result['pass@1']:.3f}, pass@{cfg.eval_samples} "
                     f"{result[f'pass@{cfg.eval_samples}']:.3f} on {int(total)} held-out {cfg.task} prompts")
            with open(self.paths.logs / "val_rl.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        with StopSignals() as self.stop:  # SIGTERM/SIGINT/SIGUSR1: stop after the step, with a checkpoint
            return self._train()

    def _train(self) -> dict:
        self.setup()
        cfg = self.cfg
        num_steps = self.num_steps()
        metrics = self.paths.logs / "train_rl.jsonl"
        step = self._resume() if cfg.resume else 0
        if self.dist.is_main:
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            if step == 0:
                for f in (metrics, self.paths.logs / "val_rl.jsonl"):
                    f.unlink(missing_ok=True)  # a fresh run starts fresh logs
        log.info(f"rl: {cfg.task}, {num_steps} steps of {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} "
                 f"samples (<= {cfg.max_new_tokens} new tokens, T={cfg.temperature}) from {self.start}, "
                 f"x{self.dist.world_size} ranks, {'eager' if cfg.eager_rollouts else 'batched'} rollouts")
        first_eval = self.evaluate(step) if cfg.eval_prompts > 0 else None
        last_eval, stats = first_eval, None
        while step < num_steps:
            stats = self.train_step(step, num_steps)
            step += 1
            if self.dist.is_main:
                with open(metrics, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            if self.on_step:
                self.on_step(stats, self)
            if cfg.eval_prompts > 0 and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < num_steps:
                last_eval = self.evaluate(step)
            stop_signal = self.stop.agreed(self.device) if step < num_steps else 0  # the same on every rank
            if cfg.save_every >= 0 and (stop_signal or step == num_steps
                                        or (cfg.save_every > 0 and step % cfg.save_every == 0)):
                self._save(step, stats)
            if stop_signal:
                self.rollouts.close()
                raise stopped_after_save(STAGE, self.stage_dir, self.cfg.save_every >= 0, step, num_steps,
                                         stop_signal, self.dist.is_main)
        if cfg.eval_prompts > 0 and (last_eval is None or last_eval["step"] != step):
            last_eval = self.evaluate(step)
        result = {"task": cfg.task, "steps": num_steps, "prompts_per_step": cfg.prompts_per_step,
                  "samples_per_prompt": cfg.samples_per_prompt, "world_size": self.dist.world_size,
                  "init_from": str(self.start), "first_eval": first_eval, "final_eval": last_eval,
                  "final_reward": stats["reward"] if stats else None}
        k = f"pass@{cfg.eval_samples}"
        for when, ev in (("before", first_eval), ("after", last_eval)):  # flat, for the report card's table
            if ev is not None:
                result[f"pass@1 {when}"], result[f"{k} {when}"] = ev["pass@1"], ev[k]
        if self.dist.is_main:
            runs.write_result(cfg.run, STAGE, result)
        self.rollouts.close()
        return result

    def train_step(self, step: int, num_steps: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        groups = self.sample_groups(self.train_task, self.local_indices(step), cfg.samples_per_prompt,
                                    cfg.temperature, (cfg.seed, "train", step))
        synchronize(self.device)
        t1 = time.perf_counter()
        stats = self.update(step, num_steps, groups)
        self.rollouts.refresh_weights(self.model)
        synchronize(self.device)
        t2 = time.perf_counter()
        rollout_s, update_s = _all_reduce([t1 - t0, t2 - t1], self.device)
        W = self.dist.world_size
        stats.update(step=step, rollout_s=rollout_s / W, update_s=update_s / W, seconds=(rollout_s + update_s) / W,
                     rollout_tok_per_s=stats["completion_tokens"] / max(1e-9, rollout_s / W))
        if self.dist.is_main:
            log.info(f"rl step {step + 1}/{num_steps}: reward {stats['reward']:.3f}, loss {stats['loss']:+.4f}, "
                     f"rollout {stats['rollout_s']:.1f}s ({stats['rollout_tok_per_s']:,.0f} tok/s), "
                     f"update {stats['update_s']:.1f}s")
        return stats

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        cfg = self.cfg
        same = {k: getattr(cfg, k) for k in ("task", "prompts_per_step", "samples_per_prompt", "seed", "std_normalize",
                                             "kl_coef", "lr_frac", "max_new_tokens", "temperature", "train_size")}
        return {"model": self.model_cfg.to_dict(), "stage": STAGE, "rl": same, "init_from": str(self.start),
                "world_size": self.dist.world_size}

    def _save(self, step: int, stats: dict) -> None:
        ckpt.save_from_ranks(self.stage_dir, step, self.model, self.optimizers,
                             {**self._meta(), "loss": stats["loss"], "reward": stats["reward"]},
                             {"rng": ckpt.rng_state(self.device)})

    def _resume(self) -> int:
        expected = self._meta()
        found = ckpt.load_for_resume(self.stage_dir, self.model, self.optimizers,
                                     {"model": expected["model"], "rl": expected["rl"]})
        if found is None:
            log.info(f"--resume: no checkpoint in {self.stage_dir}; starting from the SFT weights")
            return 0
        path, state = found
        self.rollouts.refresh_weights(self.model)
        ranks = state.get("ranks", [])
        if len(ranks) == self.dist.world_size:
            ckpt.restore_rng(ranks[self.dist.rank]["rng"], self.device)
        log.info(f"resumed rl from {path} at step {state['step']}")
        return int(state["step"])


def rl_train(cfg: RLConfig, on_step=None, tasks: tuple | None = None) -> dict:
    return RLTrainer(cfg, on_step, tasks).train()
