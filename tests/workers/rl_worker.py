"""Runs a tiny `picochat rl` in its own process (alone or under torchrun) for the RL tests.

--kill-at-step N sends SIGKILL to itself when step N finishes: a real crash, mid-run.
--out FILE writes, from rank 0, each rank's weight checksum and the run's result as JSON."""

import argparse
import json
import os
import signal

import torch

from picochat.common import cleanup_distributed, dist_info, setup_logging
from picochat.config import RLConfig
from picochat.train.rl import RLTrainer

p = argparse.ArgumentParser()
p.add_argument("--run-name", dest="run", required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--save-every", type=int, default=2)
p.add_argument("--kill-at-step", type=int, default=-1)
p.add_argument("--resume", action="store_true")
p.add_argument("--eager-rollouts", action="store_true")
p.add_argument("--out")
args = p.parse_args()

torch.set_num_threads(1)
setup_logging()
cfg = RLConfig(run=args.run, num_steps=args.steps, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=80,
               device_batch_size=4, eval_prompts=4, eval_samples=2, eval_every=0, save_every=args.save_every,
               resume=args.resume, device="cpu", eager_rollouts=args.eager_rollouts, lr_frac=0.5)


def on_step(stats, trainer):
    if stats["step"] + 1 == args.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)


trainer = RLTrainer(cfg, on_step=on_step)
result = trainer.train()
info = dist_info()
checksum = float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(trainer.model.parameters())))
local = {"rank": info.rank, "checksum": checksum, "result": result}
gathered = [local]
if info.world_size > 1:
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, local)
if info.rank == 0 and args.out:
    with open(args.out, "w") as f:
        json.dump(gathered, f)
del trainer
cleanup_distributed()
