"""What the once-per-step stop agreement costs: one all-reduce (MAX) of a 4-byte flag plus reading it
back, as `StopSignals.agreed` does after every optimizer step. Run under torchrun (gloo on CPU, NCCL
on GPUs); rank 0 prints a line and, last, one JSON object:
    torchrun --nproc_per_node=2 tests/workers/stop_check_cost.py"""

import json
import time

import torch

from picochat.common import detect_device, gpu_name, init_distributed
from picochat.train.preemption import StopSignals

device = detect_device("auto")
dist = init_distributed(device)
stop = StopSignals()
for _ in range(50):  # warm-up: connections, CUDA context
    stop.agreed(device)
n = 2000
if device.type == "cuda":
    torch.cuda.synchronize(device)
t0 = time.perf_counter()
for _ in range(n):
    stop.agreed(device)
us = (time.perf_counter() - t0) / n * 1e6
if dist.is_main:
    backend = torch.distributed.get_backend()
    print(f"stop check: {us:.1f} us per step ({backend}, {dist.world_size} ranks, {gpu_name(device)})")
    print(json.dumps({"bench": "stop_check", "backend": backend, "world_size": dist.world_size,
                      "gpu": gpu_name(device), "torch": torch.__version__, "us_per_step": round(us, 1)}))
torch.distributed.destroy_process_group()
