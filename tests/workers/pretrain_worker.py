"""Runs a tiny pretraining in its own process (alone or under torchrun) for the training tests.

--kill-at-step N sends SIGKILL to itself when step N finishes: a real crash, mid-training.
--signal-at-step N sends --signal to itself (on --signal-rank only) when step N finishes: a real
signal (--which-signal), as a scheduler sends it; --signal-again-after S sends it once more S seconds later.
--corrupt-at-step N overwrites the file --corrupt with junk when step N finishes.
--out FILE writes, from rank 0, the per-rank weight checksums and first-batch documents as JSON.
A graceful stop exits with the CLI's exit code for it."""

import argparse
import json
import os
import signal
import sys
import time

import torch

from picochat.common import cleanup_distributed, dist_info
from picochat.config import DataConfig, TrainConfig
from picochat.train.cli import pretrain
from picochat.train.preemption import TrainingStopped

p = argparse.ArgumentParser()
p.add_argument("--run-name", dest="run", required=True)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--device-batch-size", type=int, default=4)
p.add_argument("--total-batch-tokens", type=int, default=256)
p.add_argument("--save-every", type=int, default=4)
p.add_argument("--kill-at-step", type=int, default=-1)
p.add_argument("--signal-at-step", type=int, default=-1)
p.add_argument("--which-signal", default="SIGTERM")  # not "--signal": torchrun takes it for its --signals-to-handle
p.add_argument("--signal-rank", type=int, default=0)
p.add_argument("--signal-again-after", type=float, default=None)
p.add_argument("--corrupt-at-step", type=int, default=-1)
p.add_argument("--corrupt")
p.add_argument("--paths", nargs="+", default=[])
p.add_argument("--strict-data", action="store_true")
p.add_argument("--keep-last", type=int, default=2)
p.add_argument("--device", default="cpu", help="auto: one GPU per rank (the GPU tests)")
p.add_argument("--resume", action="store_true")
p.add_argument("--out")
args = p.parse_args()

torch.set_num_threads(1)
cfg = TrainConfig(run=args.run, depth=1, seq_len=32, device_batch_size=args.device_batch_size,
                  total_batch_tokens=args.total_batch_tokens, num_steps=args.steps, eval_every=0,
                  sample_every=0, save_every=args.save_every, keep_last=args.keep_last, resume=args.resume,
                  device=args.device)
data = DataConfig(embedded_docs=2000, strict_data=args.strict_data,
                  **({"source": "files", "paths": args.paths} if args.paths else {}))


def on_step(stats, trainer):
    done = stats.step + 1
    if done == args.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    if done == args.corrupt_at_step:
        size = os.path.getsize(args.corrupt)
        with open(args.corrupt, "wb") as f:
            f.write(b"damaged!" * (size // 8 + 1))
    if done == args.signal_at_step and trainer.dist.rank == args.signal_rank:
        sig = getattr(signal, args.which_signal)
        os.kill(os.getpid(), sig)
        if args.signal_again_after is not None:
            time.sleep(args.signal_again_after)
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the second signal must end the process before this ends


seen = {}
import picochat.train.loop as loop_mod  # noqa: E402

original = loop_mod.Trainer._setup


def setup_and_record(self):
    original(self)
    seen["trainer"] = self


loop_mod.Trainer._setup = setup_and_record
try:
    result = pretrain(cfg, data, on_step=on_step)
except TrainingStopped as e:
    del seen["trainer"]
    cleanup_distributed()
    sys.exit(e.exit_code)
trainer = seen["trainer"]
info = dist_info()


class FixedBatches:
    """One fixed global batch of 8 rows: rank r of W gets rows r*8/W..; one process takes them all in order."""

    def __init__(self):
        g = torch.Generator().manual_seed(123)
        rows = torch.randint(0, trainer.model_cfg.vocab_size, (8, 33), generator=g)
        rows[5:, 20:] = -1  # uneven loss-token counts across micro-batches and ranks
        share = 8 // info.world_size
        self.rows = rows[info.rank * share:(info.rank + 1) * share].split(4)
        self.i = 0

    def __next__(self):
        r = self.rows[self.i]
        self.i += 1
        return {"inputs": r[:, :-1].clamp(min=0), "targets": r[:, 1:]}


# One more optimizer step on the same global batch: must give the same weights at any world size.
trainer._train_step(0, 10, FixedBatches(), 2 // info.world_size, 0.0, None)
checksum = float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(trainer.model.parameters())))
local = {"rank": info.rank, "checksum": checksum, "result": result}
if info.world_size > 1:
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, local)
else:
    gathered = [local]
if info.rank == 0 and args.out:
    with open(args.out, "w") as f:
        json.dump(gathered, f)
del trainer, seen["trainer"]
cleanup_distributed()
