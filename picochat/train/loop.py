"""The one training loop, shared by pretraining, midtraining and SFT.

What differs between stages is only where batches come from (a `BatchSource`) and where weights
start. The loop owns: device/DDP set-up, compile, the device batch size (fixed or found by
autobatch), exact token weighting across micro-batches and ranks, the LR schedule, logging (progress
bar, JSONL, TensorBoard when installed), validation bits-per-byte, samples, checkpoints and resume,
and graceful stops on SIGTERM/SIGINT/SIGUSR1 (the mechanism lives in `preemption.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..common import (DistInfo, autocast, compute_dtype, cpu_compile_problem, detect_device, gpu_name,
                      init_distributed, log, seed_everything, start_compile_workers, synchronize, use_compile_cache)
from ..config import ModelConfig, TrainConfig
from ..eval.bpb import bpb_batches, evaluate_bpb  # noqa: F401  (bpb_batches: the stages' validation batches)
from . import checkpoint as ckpt
from .. import runs
from ..runs import RunPaths
from .optim import build_optimizers, lr_multiplier, set_lr
from .preemption import StopSignals, stopped_after_save

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class BatchSource(Protocol):
    """Yields micro-batches as dicts: inputs (B,T), targets (B,T; -1 = no loss), optional doc_ids."""

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepStats:
    step: int
    loss: float
    lr_mult: float
    tok_per_s: float
    mfu: float | None
    peak_mem_gib: float
    loss_tokens: int
    seconds: float


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_tokens: int, device: torch.device) -> str:
    """A short greedy continuation without the engine (the loop must not depend on `infer`)."""
    ids = tokenizer.encode(prompt, prepend_bos=True)
    model.eval()
    for _ in range(max_tokens):
        x = torch.tensor([ids[-model.config.seq_len:]], device=device)
        with autocast(device):
            nxt = int(model(x)[0, -1].argmax())
        if tokenizer.is_special(nxt):
            break
        ids.append(nxt)
    model.train()
    return tokenizer.decode(ids[1:])


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, tokenizer,
                 make_batches: Callable[[int, DistInfo, torch.device], BatchSource],
                 make_val_batches: Callable[[int, DistInfo, torch.device], Iterator[dict]] | None = None,
                 init_from: Path | None = None, sample_prompts: tuple[str, ...] = (),
                 on_step: Callable[[StepStats, "Trainer"], None] | None = None,
                 forward_options=None, compile_mode: str | None = None):
        """forward_options (model.gpt.ForwardOptions) and compile_mode (torch.compile's `mode`) are
        the benchmark's levers; the defaults are what training runs."""
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.forward_options, self.compile_mode = forward_options, compile_mode
        self.make_batches, self.make_val_batches = make_batches, make_val_batches
        self.init_from, self.sample_prompts, self.on_step = init_from, sample_prompts, on_step
        self.paths = RunPaths.for_run(cfg.run)
        self.stage_dir = self.paths.stage(cfg.stage)

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self):
        from ..model.gpt import build_model

        cfg = self.cfg
        self.device = detect_device(cfg.device)
        self.dist = init_distributed(self.device)
        seed_everything(cfg.seed)
        use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        if use_compile and self.device.type == "cpu" and (problem := cpu_compile_problem()):
            log.warning(f"torch.compile is unavailable on this CPU, training eagerly instead: {problem}")
            use_compile = False
        if use_compile:
            use_compile_cache()
            if self.device.type == "cuda":
                start_compile_workers()  # they start while the model is built and the finder probes eagerly
        self.model = build_model(self.model_cfg, self.device, seed=cfg.seed)
        if self.forward_options is not None:
            self.model.set_options(self.forward_options)
        if self.init_from is not None:
            runs.load_weights(self.init_from, self.model)
            log.info(f"initialised weights from {self.init_from}")
        self.optimizers = build_optimizers(self.model, cfg.optim, self.device)
        wrapped = self.model
        if self.dist.is_distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = wrapped if self.dist.is_distributed else None
        self.train_model = wrapped
        if use_compile and cfg.compile_scope == "blocks":
            self.model.compile_regions(dynamic=False, mode=self.compile_mode)
        elif use_compile:
            self.train_model = torch.compile(wrapped, dynamic=False, mode=self.compile_mode)
        self.compiled = use_compile

    def _choose_device_batch(self) -> int:
        cfg, T, W = self.cfg, self.cfg.seq_len, self.dist.world_size
        self.autobatch_key = None  # the finder's cache entry, marked bad if training then runs out of memory
        if cfg.device_batch_size == "auto":
            from .autobatch import find_device_batch_size

            default = max(1, min(32, cfg.total_batch_tokens // (T * W)))
            result = find_device_batch_size(
                train_step=self._probe_step, model=self.model, optimizers=self.optimizers, seq_len=T,
                total_batch_tokens=cfg.total_batch_tokens, world_size=W, device=self.device,
                cache_key={"model": self.model_cfg.to_dict(), "seq_len": T, "compile": self.compiled,
                           "compile_scope": cfg.compile_scope,
                           "dtype": str(compute_dtype(self.device)),
                           "stage": cfg.stage},
                default=default,
                # Pretraining's eager step is a safe (larger) memory bound; chat stages' document masks
                # run FlexAttention, whose eager form materialises every score: no bound worth having.
                eager_probe=not runs.STAGES[cfg.stage].chat)
            self.autobatch_key = result.cache_key
            return result.device_batch_size
        B = int(cfg.device_batch_size)
        if cfg.total_batch_tokens % (B * T * W):
            raise ValueError(f"total batch {cfg.total_batch_tokens} tokens is not a multiple of device batch "
                             f"{B} × seq len {T} × world {W}; pick --device-batch-size so it divides exactly "
                             f"(or use --device-batch-size auto)")
        return B

    def _probe_step(self, batch_size: int) -> None:
        """One real micro-step + optimizer step on random tokens (autobatch measures its memory).
        Called exactly as training calls the model, so the compiled graph is the same one."""
        V, T = self.model_cfg.vocab_size, self.cfg.seq_len
        x = torch.randint(0, V, (batch_size, T), device=self.device)
        micro = {"inputs": x, "targets": x}
        if runs.STAGES[self.cfg.stage].chat:  # chat stages train with document masks: probe with one too
            micro["doc_ids"] = (torch.arange(T, device=self.device) // 256).expand(batch_size, T)
        # no_sync: a rank that runs out of memory mid-backward must not leave the others in a collective
        with (self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()), autocast(self.device):
            loss = self.train_model(x, x, attn_mask=self._attn_mask(micro), loss_reduction="sum")
        (loss / x.numel()).backward()
        with contextlib.ExitStack() as local:  # no collective inside a probe: Muon works unshared
            for opt in self.optimizers:
                if hasattr(opt, "collectives_off"):
                    local.enter_context(opt.collectives_off())
            for opt in self.optimizers:
                opt.step()
        self.model.zero_grad(set_to_none=True)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        self._setup()
        cfg, dist, device = self.cfg, self.dist, self.device
        B = self._choose_device_batch()
        T = cfg.seq_len
        grad_accum = cfg.total_batch_tokens // (B * T * dist.world_size)
        num_steps = cfg.num_steps
        if num_steps < 0:
            num_steps = max(1, int(cfg.data_param_ratio * self.model.num_params()) // cfg.total_batch_tokens)
        batches = self.make_batches(B, dist, device)
        step, metrics_path = 0, self.paths.logs / f"train_{cfg.stage}.jsonl"
        if cfg.resume:
            step = self._resume(batches)
        elif dist.is_main and metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log
        flops_tok = self.model.flops_per_token(T)
        peak = peak_flops(device)
        log.info(f"{cfg.stage}: {self.model.num_params() / 1e6:.2f}M params, depth {self.model_cfg.n_layer}, "
                 f"width {self.model_cfg.n_embd}, device {gpu_name(device)} x{dist.world_size}, device batch {B}, "
                 f"grad accum {grad_accum}, {cfg.total_batch_tokens} tokens/step, {num_steps} steps"
                 + (", compiled (the first step compiles: seconds to a minute)" if self.compiled else ""))
        if dist.is_main and cfg.save_every >= 0:
            ckpt.prepare_stage_dir(self.stage_dir, self.model, self.optimizers, cfg.keep_last)
        writer = self._tensorboard() if dist.is_main else None
        bar = self._progress(num_steps, step)
        last_val, stats = None, None
        result = {"steps": num_steps, "device_batch_size": B, "grad_accum": grad_accum}
        stop = StopSignals().install()  # SIGTERM/SIGINT/SIGUSR1 now ask for a stop after the step
        try:
            while step < num_steps:
                if self.make_val_batches and cfg.eval_every > 0 and step % cfg.eval_every == 0:
                    last_val = self._validate(step, writer)
                stats = self._train_step(step, num_steps, batches, grad_accum, flops_tok, peak)
                step += 1
                self._log_step(stats, metrics_path, writer, bar, last_val)
                if cfg.sample_every > 0 and step % cfg.sample_every == 0:
                    self._samples(step)
                # once per step, on every rank: did any rank get a stop signal? (a finished run just ends)
                stop_signal = stop.agreed(device) if step < num_steps else 0
                if cfg.save_every >= 0 and (stop_signal or step == num_steps
                                            or (cfg.save_every > 0 and step % cfg.save_every == 0)):
                    self._save(step, batches, stats.loss, last_val)
                if stop_signal:
                    raise stopped_after_save(self.cfg.stage, self.stage_dir, self.cfg.save_every >= 0, step, num_steps,
                                             stop_signal, self.dist.is_main)
            stop.restore()
            if self.make_val_batches:
                last_val = self._validate(step, writer)
            result.update(final_loss=stats.loss if stats is not None else None, val_bpb=last_val)
        except Exception as e:
            self._mark_batch_bad_on_oom(e, B)
            raise
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if hasattr(batches, "close"):
                batches.close()
        return result

    def _mark_batch_bad_on_oom(self, exc: BaseException, batch_size: int) -> None:
        """Out of memory at a size the finder chose: mark its cache entry bad, so the next run (a
        --resume, say) searches below that size instead of reusing it."""
        from .autobatch import is_oom_error
        from .autobatch_cache import mark_bad

        if getattr(self, "autobatch_key", None) and is_oom_error(exc):
            mark_bad(self.autobatch_key, batch_size)
            log.error(f"out of memory at device batch {batch_size}, which autobatch chose: marked it bad in the "
                      f"cache; the next run (e.g. with --resume) picks a smaller size")

    def _train_step(self, step, num_steps, batches, grad_accum, flops_tok, peak) -> StepStats:
        cfg, device, world = self.cfg, self.device, self.dist.world_size
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr_mult = set_lr(self.optimizers, lr_multiplier(step, num_steps, cfg.optim))
        micro = [next(batches) for _ in range(grad_accum)]
        # Exact token weighting: every loss-bearing token of the whole step (all micro-batches, all
        # ranks) weighs the same, however unevenly they fall into micro-batches.
        # Counted on the device: no host sync before the forward passes are queued.
        counts = sum((m["targets"].to(device, non_blocking=True) >= 0).sum() for m in micro).float()
        if self.dist.is_distributed:
            torch.distributed.all_reduce(counts)
        n_loss = counts.clamp(min=1.0)
        loss_sum = torch.zeros((), device=device)
        for i, m in enumerate(micro):
            x, y = m["inputs"].to(device, non_blocking=True), m["targets"].to(device, non_blocking=True)
            mask = self._attn_mask(m)
            sync = self.ddp is None or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), autocast(device):
                loss = self.train_model(x, y, attn_mask=mask, loss_reduction="sum")
            (loss * (world / n_loss)).backward()
            loss_sum += loss.detach().float()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        if self.dist.is_distributed:
            torch.distributed.all_reduce(loss_sum)
        loss_value, n_loss = (loss_sum / n_loss).item(), n_loss.item()  # the host syncs of the step
        if not math.isfinite(loss_value):
            last = runs.latest_checkpoint(self.stage_dir)
            raise TrainingDiverged(f"loss became {loss_value} at step {step}; stopping. Last good checkpoint: "
                                   f"{last or 'none'} (resume with --resume, perhaps with a lower learning rate)")
        synchronize(device)
        seconds = time.perf_counter() - t0
        tokens = cfg.total_batch_tokens
        tok_per_s = tokens / seconds
        mfu = flops_tok * tok_per_s / (peak * world) if peak else None
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        return StepStats(step, loss_value, lr_mult, tok_per_s, mfu, mem, int(n_loss), seconds)

    def _attn_mask(self, micro: dict):
        doc_ids = micro.get("doc_ids")
        if doc_ids is None:
            return None
        from ..model.attention import document_mask

        return document_mask(doc_ids.to(self.device, non_blocking=True))

    # -- logging -------------------------------------------------------------------------------
    def _progress(self, total: int, initial: int):
        if not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=self.cfg.stage, unit="step", dynamic_ncols=True)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; metrics go to the JSONL log only")
            return None
        return SummaryWriter(log_dir=str(self.paths.logs / "tensorboard" / self.cfg.stage))

    def _log_step(self, s: StepStats, metrics_path: Path, writer, bar, last_val) -> None:
        if self.on_step:
            self.on_step(s, self)
        if not self.dist.is_main:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(asdict(s)) + "\n")
        if writer is not None:
            writer.add_scalar("train/loss", s.loss, s.step)
            writer.add_scalar("train/tok_per_s", s.tok_per_s, s.step)
            writer.add_scalar("train/lr_mult", s.lr_mult, s.step)
            if s.mfu is not None:
                writer.add_scalar("train/mfu", s.mfu, s.step)
        if bar is not None:
            post = {"loss": f"{s.loss:.3f}", "tok/s": f"{s.tok_per_s:,.0f}"}
            if s.mfu is not None:
                post["mfu"] = f"{100 * s.mfu:.1f}%"
            if s.peak_mem_gib:
                post["mem"] = f"{s.peak_mem_gib:.1f}G"
            if last_val is not None:
                post["val_bpb"] = f"{last_val:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    def _validate(self, step: int, writer) -> float:
        token_bytes = torch.tensor(self.tokenizer.token_byte_lengths, device=self.device)
        bpb = evaluate_bpb(self.model, self.make_val_batches(self.cfg.seq_len, self.dist, self.device),
                           token_bytes, self.device)
        if writer is not None:
            writer.add_scalar("val/bpb", bpb, step)
        if self.dist.is_main:
            log.info(f"step {step}: validation {bpb:.4f} bits/byte")
            with open(self.paths.logs / f"val_{self.cfg.stage}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "val_bpb": bpb}) + "\n")
        return bpb

    def _samples(self, step: int) -> None:
        if not self.dist.is_main or not self.sample_prompts:
            return
        for prompt in self.sample_prompts:
            log.info(f"sample @{step}: {greedy_sample(self.model, self.tokenizer, prompt, 24, self.device)!r}")

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"model": self.model_cfg.to_dict(), "stage": self.cfg.stage,
                "train": {"seq_len": self.cfg.seq_len, "total_batch_tokens": self.cfg.total_batch_tokens,
                          "seed": self.cfg.seed, "depth": self.cfg.depth},
                "world_size": self.dist.world_size}

    def _save(self, step: int, batches, loss: float, val_bpb) -> None:
        local = {"loader": batches.state_dict(), "rng": ckpt.rng_state(self.device)}
        ckpt.save_from_ranks(self.stage_dir, step, self.model, self.optimizers,
                             {**self._meta(), "loss": loss, "val_bpb": val_bpb}, local, self.cfg.keep_last)

    def _resume(self, batches) -> int:
        expected = self._meta()
        found = ckpt.load_for_resume(self.stage_dir, self.model, self.optimizers,
                                     {"model": expected["model"], "train": expected["train"]})
        if found is None:
            log.info(f"--resume: no checkpoint in {self.stage_dir}; starting from scratch")
            return 0
        path, state = found
        ranks = state.get("ranks", [])
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            batches.load_state_dict(mine["loader"])
            ckpt.restore_rng(mine["rng"], self.device)
        else:
            how = "the data order restarts from the beginning"
            if hasattr(batches, "continue_after"):
                batches.continue_after([r["loader"] for r in ranks])
                how = "the data continues past the furthest position any rank had reached"
            log.warning(f"checkpoint was written by {len(ranks)} rank(s), this run has {self.dist.world_size}: "
                        f"weights and optimizer resume exactly, {how}")
        log.info(f"resumed from {path} at step {state['step']}")
        return int(state["step"])
