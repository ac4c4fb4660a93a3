"""Shared plumbing: device and dtype detection, distributed init, the home folder, logging, atomic
writes. Near the bottom of the dependency graph: it imports only `config` (for ConfigError)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, check_device

if TYPE_CHECKING:  # torch is imported inside the functions: `picochat --help` should not pay ~2 s for it
    import torch

log = logging.getLogger("picochat")


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        try:
            from rich.console import Console
            from rich.logging import RichHandler

            # logs on stderr, results on stdout: `picochat ... > out.json` stays clean
            handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False,
                                                   rich_tracebacks=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:  # pragma: no cover - rich is a dependency
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(level if dist_info().rank == 0 else logging.WARNING)
    log.propagate = False


# ---------------------------------------------------------------------------------------------------
# run directory


def picochat_home() -> Path:
    return Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()


def use_compile_cache() -> Path:
    """Keep torch.compile's caches (inductor's FX graphs, AOT autograd results, Triton kernels) under
    $PICOCHAT_HOME/compile_cache instead of /tmp, so they outlive a reboot and the second run of the same
    shapes is warm (the batch-size finder compiles three shapes). A directory the user set wins."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(picochat_home() / "compile_cache")))
    return path


def start_compile_workers() -> None:
    """Start inductor's pool of kernel-compiling subprocesses now, in the background. torch starts it
    at the first compile, and until its workers have imported torch (seconds) the first graph's
    kernels are compiled one by one in this process; started at set-up, the pool is ready by the time
    the model is built and the batch-size finder's eager probe is done. CUDA only (the pool compiles
    Triton kernels); a torch without this internal function just starts it later, as before."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:
        return
    maybe_warm_pool()


@functools.cache
def cpu_compile_problem() -> str | None:
    """Why torch.compile cannot run on this CPU, or None where it can. On CPU the compiler turns each
    graph into C++ and builds it with the system's C++ compiler and the Python headers; without them
    training would fail at its first step, so callers fall back to eager with this reason. One tiny
    compile (a second or two cold, cached under $PICOCHAT_HOME like every graph) answers for both."""
    import torch

    def first_line(e: Exception) -> str:  # torch's messages run to pages; some exceptions have none
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # torch names the compilers it looked for
        return f"no C++ compiler ({first_line(e)})"
    try:
        use_compile_cache()
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4))
    except Exception as e:
        return f"a test compile failed: {type(e).__name__}: {first_line(e)}"
    return None


def downloads_dir() -> Path:
    return picochat_home() / "downloads"


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# devices and precision


def detect_device(preference: str = "auto") -> torch.device:
    """The device to use: `preference` if this machine has it (ConfigError naming --device if not)."""
    import torch

    if preference != "auto":
        check_device(preference)
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError("device", f"auto or cpu here ({why})", preference)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"cuda:0 to cuda:{torch.cuda.device_count() - 1}", preference)
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device", "auto or cpu here (MPS is not available)", preference)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info().local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype of matrix products: bf16 on CUDA (fp32 master weights), fp32 elsewhere (CPU bf16 can be
    emulated in software). The one place this rule is written."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    import torch

    if compute_dtype(device) != torch.float32:
        return torch.autocast(device_type=device.type, dtype=compute_dtype(device))
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gpu_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cpu_description() -> str:
    """This CPU by its model name, the vector extension torch dispatches to (which decides whether
    bfloat16 matrix products run natively or emulated) and the core count."""
    import torch

    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    caps = [f"{lib} {os.environ[var]}" for lib, var in (("oneDNN", "ONEDNN_MAX_CPU_ISA"),
                                                        ("MKL", "MKL_ENABLE_INSTRUCTIONS")) if os.environ.get(var)]
    return f"{model} ({', '.join([isa, *caps])}, {os.cpu_count()} cores)"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------------------------
# distributed (torchrun sets the env vars; we never launch processes ourselves)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    torch = sys.modules.get("torch")  # not imported yet: no process group can have been initialised
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
                        torch.distributed.get_world_size())
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo otherwise). No-op when alone."""
    import torch

    info = dist_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend,
                                             device_id=device if device.type == "cuda" else None)
    return dist_info()


def cleanup_distributed() -> None:
    """Leave the process group together: a rank that tears gloo down while a peer is still inside a
    collective can abort at exit ("terminate called without an active exception")."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        gc.collect()  # drop DDP reducers and pending work that hold the group before destroying it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum a Python number over ranks (identity when alone)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def git_commit() -> str:
    """HEAD of the checkout, or $PICOCHAT_COMMIT where the tree was copied without its history."""
    if os.environ.get("PICOCHAT_COMMIT"):
        return os.environ["PICOCHAT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
