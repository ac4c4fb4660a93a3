"""`picochat serve`: the OpenAI-compatible API and the chat page for a run's latest chat checkpoint.

The server binds first and loads the model on a background thread, so `/health` answers 503
("loading") at once and 200 when the scheduler is running. FastAPI, uvicorn and prometheus-client
come with the `serve` extra and are imported only here, when the command runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

from ..options import add_run_arg
from ..runs import CHAT_STAGE_PREFERENCE, STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model: OpenAI-compatible API and a web chat page",
                       description="Serve the run's latest chat checkpoint (stages in order "
                                   f"{', '.join(CHAT_STAGE_PREFERENCE)}) over HTTP: /v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health, /metrics and the chat page at /.")
    add_run_arg(p)
    p.add_argument("--stage", choices=list(STAGES), default=None, help="checkpoint stage (default: the last trained)")
    p.add_argument("--step", type=int, default=None, help="a specific checkpoint step (default: the latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PICOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PICOCHAT_API_KEY; /health, "
                        "/metrics and the page stay public)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="sequences decoded together (KV-cache rows; default: from free GPU memory, 8 on CPU)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 503 with Retry-After")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion tokens per sequence (default: the model's training length)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on a request's max_tokens (default: none)")
    p.add_argument("--max-n", type=int, default=16, help="most samples per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--serial", action="store_true",
                   help="answer one request at a time (the upstream web server's behaviour; a benchmark baseline)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: picochat-<run>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", choices=["fast", "eager"], default=None, help="decode path (default: fast on CUDA)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fast mode's decode step (see `picochat chat --help`)")
    p.add_argument("--compile", action="store_true", help="torch.compile the torch decode step first")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's access/error log level")
    p.set_defaults(func=run)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from .api import create_app
    except ImportError as e:
        raise RuntimeError(f"`picochat serve` needs the serve extra ({e.name} is missing): "
                           "pip install 'picochat[serve]'") from None
    from ..runs import find_checkpoint
    from .config import ServeConfig

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                         max_n=args.max_n, max_tokens=args.max_tokens, serial=args.serial,
                         model_name=args.model_name or f"picochat-{args.run}")
    stage, checkpoint = find_checkpoint(args.run, args.stage, args.step)  # a missing run fails before binding
    _check_port_free(args.host, args.port)
    app = create_app(config)
    loaded: dict = {}
    loader = threading.Thread(target=_load, args=(app, args, config, loaded), name="picochat-load", daemon=True)
    loader.start()
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"picochat serve · run {args.run} · {stage} ({checkpoint.name}) · http://{shown}:{args.port}/ "
          f"(chat page; API at /v1, health at /health, metrics at /metrics)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        scheduler = loaded.get("scheduler")
        if scheduler is not None:
            scheduler.close()
    return 0


def _load(app, args: argparse.Namespace, config, loaded: dict) -> None:
    """Load the checkpoint and start the scheduler; report failure through /health."""
    from ..common import detect_device, log
    from ..infer.scheduler import Scheduler, SchedulerConfig
    from ..runs import load_model
    from .api import attach, failed
    from .generation import Backend

    try:
        device = detect_device(args.device)
        if device.type == "cpu":
            # Leave a core to the HTTP event loop: with every core in torch's pool, a pool worker
            # pre-empted by the loop stalls each op's barrier, and decoding slows down many times over.
            import torch

            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
        model, tokenizer, meta = load_model(args.run, args.stage, device, args.step)
        sched_config = SchedulerConfig(slots=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                                       mode=args.mode, kernels=args.kernels, compile=args.compile)
        scheduler = Scheduler(model, tokenizer, sched_config).start()
        loaded["scheduler"] = scheduler
        attach(app, Backend(scheduler, tokenizer, model, config.model_name, scheduler.max_context))
        log.info(f"serving {meta['stage']} step {meta.get('step', '?')} on {device.type}: "
                 f"{scheduler.slots} slots x {scheduler.max_context} tokens")
    except Exception as e:  # the server stays up and says why in /health
        log.exception("loading the model failed")
        failed(app, f"{type(e).__name__}: {e}")
