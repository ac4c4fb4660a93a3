"""The two generation endpoints: `/v1/chat/completions` and `/v1/completions`, streamed or whole.

Each handler validates (protocol), submits (generation.submit_all), then either returns a
`GenerationStream` of SSE chunks (chat: first a role chunk, then content deltas, each sample's last
with its `finish_reason`, an optional usage chunk, then `data: [DONE]`) or waits for the whole answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import responses as R
from .generation import Collector, Server, echo_logprobs, merged, submit_all, unless_disconnected
from .protocol import ChatCompletionRequest, CompletionRequest, Job, Limits, chat_job, completion_jobs, error_body

log = logging.getLogger("picochat.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's code for "client closed the request": nobody reads it


class GenerationStream(StreamingResponse):
    """An SSE response that, however it ends (finished, client gone, never started), cancels its
    requests and gives back the serial turn."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _answer(server: Server, request: Request, jobs: list[Job], chat: bool, stream: bool, streamer,
                  whole) -> Response:
    """Shared skeleton: take the turn, submit, then stream or wait (watching for a disconnect)."""
    release = await server.take_turn()
    try:
        handles = submit_all(server, jobs, "messages" if chat else "prompt")
    except BaseException:
        release()
        raise
    collector = Collector(server.ready(), jobs, handles, server.metrics.observe(), chat_logprobs=chat)

    def close() -> None:
        if any(h is not None and not h.done for h in handles):
            collector.abandon()
        for h in handles:
            if h is not None and not h.done:
                h.cancel()
        release()

    if stream:
        return GenerationStream(streamer(collector, handles), close)
    server.metrics.in_progress.inc()
    try:
        result = await unless_disconnected(request, whole(collector, handles), handles)
    finally:
        server.metrics.in_progress.dec()
        close()
    return JSONResponse(result) if result is not None else Response(status_code=CLIENT_GONE)


async def _guarded(server: Server, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A started stream reports a failure in-band (an error event, then [DONE])."""
    server.metrics.in_progress.inc()
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:
        log.exception("error while streaming", exc_info=e)
        yield R.sse(error_body("internal error while generating", "server_error"))
        yield R.SSE_DONE
    finally:
        server.metrics.in_progress.dec()


def _finishing(st) -> str | None:
    """The finish reason to send with this chunk (once per sample), or None."""
    if st.reason is not None and not st.sent_finish:
        st.sent_finish = True
        return st.reason
    return None


# ---------------------------------------------------------------------------------------------------
# chat


async def chat_completions(server: Server, limits: Limits, body: ChatCompletionRequest, request: Request) -> Response:
    backend = server.ready()
    job = chat_job(body, backend.tokenizer, limits)
    rid, created = R.new_id("chatcmpl"), R.now()

    def streamer(c: Collector, handles) -> AsyncIterator[bytes]:
        return _guarded(server, _chat_stream(c, handles, body, rid, created))

    def whole(c: Collector, handles):
        return _chat_whole(c, handles, body, rid, created)

    return await _answer(server, request, [job], True, body.stream, streamer, whole)


async def _chat_stream(c: Collector, handles, body: ChatCompletionRequest, rid: str, created: int
                       ) -> AsyncIterator[bytes]:
    model, with_usage = c.backend.name, body.include_usage
    yield R.sse(R.chat_chunk(rid, created, model, [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(body.n)], with_usage))
    states = c.samples[0]
    async for j, batch in merged(handles):
        new = c.apply(j, batch)
        choices = []
        for i, st in enumerate(states):
            if i not in new and not st.logprob_entries and (st.reason is None or st.sent_finish):
                continue
            lps = {"content": st.logprob_entries} if st.logprob_entries else None
            st.logprob_entries = []
            choices.append({"index": i, "delta": {"content": new[i]} if i in new else {}, "logprobs": lps,
                            "finish_reason": _finishing(st)})
        if choices:
            yield R.sse(R.chat_chunk(rid, created, model, choices, with_usage))
    c.done()
    if with_usage:
        yield R.sse({**R.chat_chunk(rid, created, model, [], False), "usage": c.usage()})
    yield R.SSE_DONE


async def _chat_whole(c: Collector, handles, body: ChatCompletionRequest, rid: str, created: int) -> dict:
    logprobs: list[list] = [[] for _ in range(body.n)]
    async for j, batch in merged(handles):
        c.apply(j, batch)
        for i, st in enumerate(c.samples[0]):
            logprobs[i].extend(st.logprob_entries)
            st.logprob_entries = []
    c.done()
    choices = [{"index": i, "message": {"role": "assistant", "content": st.text.text},
                "logprobs": {"content": logprobs[i]} if body.logprobs else None, "finish_reason": st.reason}
               for i, st in enumerate(c.samples[0])]
    return {"id": rid, "object": "chat.completion", "created": created, "model": c.backend.name,
            "choices": choices, "usage": c.usage()}


# ---------------------------------------------------------------------------------------------------
# completions


async def completions(server: Server, limits: Limits, body: CompletionRequest, request: Request) -> Response:
    backend = server.ready()
    jobs = completion_jobs(body, backend.tokenizer, limits, backend.model.config.vocab_size)
    rid, created = R.new_id("cmpl"), R.now()

    def streamer(c: Collector, handles) -> AsyncIterator[bytes]:
        return _guarded(server, _completion_stream(c, handles, body, rid, created))

    def whole(c: Collector, handles):
        return _completion_whole(c, handles, body, rid, created)

    return await _answer(server, request, jobs, False, body.stream, streamer, whole)


async def _echoes(c: Collector, body: CompletionRequest) -> list[str]:
    """Per job: the echoed prompt text ("" without echo). The prompt's log-probabilities go ahead of
    the generated tokens' in every sample of the job."""
    echoes = []
    for j, job in enumerate(c.jobs):
        if not job.echo:
            echoes.append("")
            continue
        lps = c.completion_lp[j]
        text = await echo_logprobs(c.backend, job, lps[0] if body.logprobs is not None else None)
        for other in lps[1:]:
            other.tokens, other.token_logprobs = list(lps[0].tokens), list(lps[0].token_logprobs)
            other.top_logprobs, other.text_offset = list(lps[0].top_logprobs), list(lps[0].text_offset)
        for lp in lps:
            lp.offset = len(text)
        echoes.append(text)
    return echoes


def _index(jobs: list[Job], j: int, i: int) -> int:
    return sum(job.params.n for job in jobs[:j]) + i


async def _completion_stream(c: Collector, handles, body: CompletionRequest, rid: str, created: int
                             ) -> AsyncIterator[bytes]:
    model, with_usage = c.backend.name, body.include_usage
    want_lp = body.logprobs is not None
    echoes = await _echoes(c, body)
    first = [{"index": _index(c.jobs, j, i), "text": echoes[j],
              "logprobs": c.completion_lp[j][i].take() if want_lp else None,
              "finish_reason": None if job.generate else "length"}
             for j, job in enumerate(c.jobs) for i in range(job.params.n) if echoes[j] or not job.generate]
    if first:
        yield R.sse(R.completion_chunk(rid, created, model, first, with_usage))
    async for j, batch in merged(handles):
        new = c.apply(j, batch)
        choices = []
        for i, st in enumerate(c.samples[j]):
            if i not in new and (st.reason is None or st.sent_finish):
                continue
            choices.append({"index": _index(c.jobs, j, i), "text": new.get(i, ""),
                            "logprobs": c.completion_lp[j][i].take() if want_lp else None,
                            "finish_reason": _finishing(st)})
        if choices:
            yield R.sse(R.completion_chunk(rid, created, model, choices, with_usage))
    c.done()
    if with_usage:
        yield R.sse({**R.completion_chunk(rid, created, model, [], False), "usage": c.usage()})
    yield R.SSE_DONE


async def _completion_whole(c: Collector, handles, body: CompletionRequest, rid: str, created: int) -> dict:
    echoes = await _echoes(c, body)
    async for j, batch in merged(handles):
        c.apply(j, batch)
    c.done()
    choices = [{"index": _index(c.jobs, j, i), "text": echoes[j] + st.text.text,
                "logprobs": c.completion_lp[j][i].take() if body.logprobs is not None else None,
                "finish_reason": st.reason or "length"}
               for j in range(len(c.jobs)) for i, st in enumerate(c.samples[j])]
    return {"id": rid, "object": "text_completion", "created": created, "model": c.backend.name,
            "choices": choices, "usage": c.usage()}
