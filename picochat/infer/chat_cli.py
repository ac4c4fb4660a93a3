"""`picochat chat`: talk to a trained model in the terminal.

Interactive multi-turn chat with streaming, UTF-8-safe output, or a one-shot answer with `-p`.
Loads the run's latest chat checkpoint (rl, else sft, else mid; else base, with a warning), and says which. When a conversation
outgrows the model's context, the oldest turns are dropped with a visible notice. Tool calls the
model makes are shown inline as `[python: expr]` and `[= result]`. Replies are requests to the
scheduler (`scheduler.py`), read as events whose message parts `parts.MessageParser` labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from ..options import add_config_options, add_run_arg, config_from_args
from ..config import SamplingConfig
from ..runs import CHAT_STAGE_PREFERENCE, STAGES

HELP = """commands:
  /clear            forget the conversation
  /temperature X    sampling temperature (0 = greedy)
  /topk K           keep the K most likely tokens (0 = no filtering)
  /help             this text
  /quit             leave (Ctrl-D too)"""

MIN_REPLY_TOKENS = 16  # below this a reply is not worth starting: report the overflow instead


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a trained model (interactive, or one answer with -p)")
    add_run_arg(p)
    p.add_argument("--stage", choices=CHAT_STAGE_PREFERENCE, default=None,
                   help=f"checkpoint stage (default: the latest of {', then '.join(CHAT_STAGE_PREFERENCE)})")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    add_config_options(p, SamplingConfig, title="sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--mode", choices=["naive", "eager", "fast"], default=None,
                   help="decode path (default: fast on CUDA, eager elsewhere)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fast mode's decode step: hand-fused Triton kernels (auto picks them up to batch 8 "
                        "where Triton is installed) or the model's torch forward")
    p.add_argument("--compile", action="store_true",
                   help="fast mode with --kernels torch: torch.compile the decode step first (one to two "
                        "minutes of compilation)")
    p.set_defaults(func=run)


_OPEN = {"tool_call": "[python: ", "tool_output": "[= "}  # how tool parts show in the terminal
_CLOSE = {"tool_call": "]", "tool_output": "]"}


class ChatSession:
    """One conversation: renders it, fits it into the context, streams the reply through the
    scheduler (an `Engine` is accepted too: its one-row scheduler is used)."""

    def __init__(self, engine, tokenizer, sampling: SamplingConfig, out: TextIO | None = None,
                 err: TextIO | None = None):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.core = engine.scheduler(1) if hasattr(engine, "generate_batch") else engine
        self._out, self._err = out, err  # None: whatever sys.stdout/stderr are at the time of writing
        self.messages: list[dict] = []

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def clear(self) -> None:
        self.messages = []

    def _fit(self) -> tuple[list[int], int]:
        """Prompt ids and the reply budget; drops the oldest turns while the context is too small."""
        from .scheduler import ContextOverflowError

        max_tokens, limit = self.sampling.max_tokens, self.core.max_context
        # a --max-tokens larger than the context is a cap, not a demand: keep room for a full reply
        # or half the context, whichever is smaller, and say so only when a turn must go
        wanted = min(max_tokens, limit // 2)
        while True:
            ids = self.tokenizer.render_for_completion(self.messages)
            room = limit - len(ids)
            if room >= wanted:
                return ids, min(max_tokens, room)
            if len(self.messages) > 1:
                del self.messages[:2]  # one user turn and its answer
                print(f"[context full ({len(ids)} + {wanted} > {limit} tokens): dropped the oldest turn]",
                      file=self.err)
                continue
            if room >= MIN_REPLY_TOKENS:
                print(f"[long message: the reply is limited to {room} tokens]", file=self.err)
                return ids, room
            self.messages.clear()
            raise ContextOverflowError(len(ids), max_tokens, limit)

    def reply(self, text: str) -> str:
        """Stream the assistant's answer to `text`; returns the answer's text."""
        from .parts import to_content
        from .request import FinishEvent, SamplingParams, TokenEvent

        self.messages.append({"role": "user", "content": text})
        ids, max_tokens = self._fit()
        s = self.sampling
        params = SamplingParams(max_tokens=max_tokens, temperature=float(s.temperature), top_k=s.top_k or None,
                                top_p=s.top_p, seed=s.seed, stop=tuple(s.stop or ()))
        core = self.core
        handle = core.submit(ids, params)
        parts: list[tuple[str, str]] = []  # (part, text) runs, as the scheduler labels them
        shown, n_tokens, reason = "text", 0, None
        start = time.perf_counter()
        try:
            for event in core.iter_events(handle):
                if isinstance(event, TokenEvent):
                    n_tokens += 1
                    part = event.part if event.part != "special" else shown
                    if part != shown:  # entering or leaving a tool call or its output
                        self._write(_CLOSE.get(shown, "") + _OPEN.get(part, ""))
                        shown = part
                    if event.text:
                        self._write(event.text)
                        if parts and parts[-1][0] == part:
                            parts[-1] = (part, parts[-1][1] + event.text)
                        else:
                            parts.append((part, event.text))
                elif isinstance(event, FinishEvent):
                    reason = event.reason
        except BaseException:  # e.g. Ctrl-C: stop generating, free the slot
            handle.cancel()
            for _ in core.iter_events(handle):
                pass
            raise
        self._write(_CLOSE.get(shown, "") + "\n")
        elapsed = time.perf_counter() - start
        content = to_content(parts)
        self.messages.append({"role": "assistant", "content": content})
        answer = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        note = ", cut at --max-tokens" if reason == "length" else ""
        print(f"({n_tokens} tokens, {n_tokens / max(elapsed, 1e-9):.1f} tok/s{note})", file=self.err)
        return answer

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; returns False when the user wants to leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/clear":
                self.clear()
                print("[conversation cleared]", file=self.err)
            elif name == "/temperature":
                self.sampling.temperature = max(0.0, float(arg))
                print(f"[temperature = {self.sampling.temperature:g}]", file=self.err)
            elif name == "/topk":
                k = int(arg)
                self.sampling.top_k = k if k > 0 else None
                print(f"[top-k = {k if k > 0 else 'off'}]", file=self.err)
            elif name == "/help":
                print(HELP, file=self.err)
            else:
                print(f"[unknown command {name}; /help lists them]", file=self.err)
        except ValueError:
            print(f"[{name} needs a number, e.g. {name} {'0.8' if name == '/temperature' else '50'}]", file=self.err)
        return True


def run(args: argparse.Namespace) -> int:
    from ..common import detect_device, log
    from ..runs import load_model
    from .scheduler import ContextOverflowError, Scheduler, SchedulerConfig

    sampling = config_from_args(args, SamplingConfig)  # bad values stop here, before the model loads
    sampling.top_k = sampling.top_k or None
    device = detect_device(args.device)
    model, tokenizer, meta = load_model(args.run, args.stage, device)
    stage = meta.get("stage", args.stage or "?")
    log.info(f"chat: run {args.run}, stage {stage}, step {meta.get('step', '?')} ({meta.get('path', '?')})")
    if stage in STAGES and not STAGES[stage].chat:
        log.warning(f"the run has no chat checkpoint (rl, sft or mid): this is its {stage} model, which was "
                    "not trained on conversations; `picochat midtrain` and `picochat sft` train one")
    # one conversation at a time: one slot (the server is what batches many)
    engine = Scheduler(model, tokenizer, SchedulerConfig(
        slots=1, mode=args.mode, compile=args.compile,
        kernels=args.kernels if (args.mode or "fast") == "fast" else "auto"))
    session = ChatSession(engine, tokenizer, sampling)
    if args.prompt is not None:
        session.reply(args.prompt)  # a ContextOverflowError reaches the CLI's error report (exit 1)
        return 0
    print(f"picochat chat · run {args.run} · {stage} step {meta.get('step', '?')} · {device.type} · "
          f"{engine.mode} decode · /help for commands", file=sys.stderr)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        print("bot> ", end="", flush=True)
        try:
            session.reply(line)
        except ContextOverflowError as e:
            print(f"\n[{e}: shorten the message]", file=sys.stderr)
        except KeyboardInterrupt:  # stop this reply, keep the chat; the unanswered turn is dropped
            print("\n[interrupted]", file=sys.stderr)
            if session.messages and session.messages[-1]["role"] == "user":
                session.messages.pop()
