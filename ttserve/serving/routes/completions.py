"""POST /v1/completions, streamed or whole, with the legacy API's `echo` + `logprobs` prompt scoring."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ttserve.contract import Started, TokenLogprob
from ttserve.serving import responses
from ttserve.serving.errors import documented
from ttserve.serving.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TTTInfo,
)

router = APIRouter()


@router.post(
    "/v1/completions",
    responses={
        200: {
            "model": CompletionResponse,
            "content": {"text/event-stream": {}},
            "description": "Or events, with stream",
        },
        **documented(400, 401, 404, 408, 413, 429, 500, 503),
    },
)
async def completions(body: CompletionRequest, request: Request):
    reply = await responses.answer(request, body, "cmpl")
    echo = _echo(body, reply.started) if body.echo else None
    if reply.events is not None:
        return _stream(reply, body, echo, responses.StreamTimer(request.app.state.metrics, "completions"))
    whole = reply.whole
    text = whole.text
    logprobs = _logprobs(whole.logprobs) if body.logprobs is not None else None
    if echo is not None:
        text = echo[0] + text
        logprobs = _join(echo[1], logprobs) if logprobs is not None else None
    choice = CompletionChoice(
        text=text, logprobs=logprobs, finish_reason=responses.finish(whole.finish_reason)
    )
    return CompletionResponse(
        id=reply.id,
        model=body.model,
        choices=[choice],
        usage=responses.usage(whole),
        ttt=TTTInfo.of(reply.started.ttt),
    ).model_dump(mode="json")


def _logprobs(entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    logprobs = CompletionLogprobs()
    for entry in entries:
        logprobs.tokens.append(entry.token)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({t: lp for _, t, lp in entry.top})
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
    return logprobs


def _echo(body: CompletionRequest, started: Started) -> tuple[str, CompletionLogprobs | None]:
    """The prompt's text and, with logprobs, its per-token logprobs (the first token has none)."""
    scores = started.prompt_scores
    text = body.prompt if isinstance(body.prompt, str) else None
    if scores is None:
        return (text if text is not None else ""), None
    logprobs = CompletionLogprobs()
    offset = 0
    for token, logprob, top in zip(scores.tokens, scores.logprobs, scores.top, strict=True):
        logprobs.tokens.append(token)
        logprobs.token_logprobs.append(logprob)
        logprobs.top_logprobs.append(None if top is None else {t: lp for _, t, lp in top})
        logprobs.text_offset.append(offset)
        offset += len(token)
    return (text if text is not None else "".join(scores.tokens)), logprobs


def _join(prompt: CompletionLogprobs | None, completion: CompletionLogprobs) -> CompletionLogprobs:
    if prompt is None:
        return completion
    shift = (prompt.text_offset[-1] + len(prompt.tokens[-1])) if prompt.tokens else 0
    return CompletionLogprobs(
        tokens=prompt.tokens + completion.tokens,
        token_logprobs=prompt.token_logprobs + completion.token_logprobs,
        top_logprobs=prompt.top_logprobs + completion.top_logprobs,
        text_offset=prompt.text_offset + [o + shift for o in completion.text_offset],
    )


def _stream(reply: responses.Answer, body: CompletionRequest, echo, timer: responses.StreamTimer):
    ttt = TTTInfo.of(reply.started.ttt)
    with_logprobs = body.logprobs is not None

    def chunk(choices, **extra) -> str:
        return responses.event(CompletionChunk(id=reply.id, model=body.model, choices=choices, **extra))

    async def stream():
        offset = 0
        if echo is not None:
            yield chunk([CompletionChoice(text=echo[0], logprobs=echo[1] if with_logprobs else None)])
            offset = len(echo[0])
        async for piece in reply.events:
            timer.saw(piece)
            logprobs = _logprobs(piece.logprobs, offset) if with_logprobs else None
            offset += sum(len(e.token) for e in piece.logprobs)
            if piece.final:
                last = CompletionChoice(
                    text=piece.text, logprobs=logprobs, finish_reason=responses.finish(piece.finish_reason)
                )
                yield chunk([last], ttt=None if body.include_usage else ttt)
                if body.include_usage:
                    yield chunk([], usage=responses.usage(piece), ttt=ttt)
            elif piece.text or piece.logprobs:
                yield chunk([CompletionChoice(text=piece.text, logprobs=logprobs)])
        timer.done(reply.started)

    return responses.guarded(stream)
