"""POST /v1/chat/completions, streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ttserve.contract import TokenLogprob
from ttserve.serving import responses
from ttserve.serving.errors import documented
from ttserve.serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
    TTTInfo,
)

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    responses={
        200: {
            "model": ChatCompletionResponse,
            "content": {"text/event-stream": {}},
            "description": "Or events, with stream",
        },
        **documented(400, 401, 404, 408, 413, 422, 429, 500, 503),
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    reply = await responses.answer(request, body, "chatcmpl")
    if reply.events is not None:
        return _stream(reply, body, responses.StreamTimer(request.app.state.metrics, "chat"))
    whole = reply.whole
    choice = ChatCompletionChoice(
        message=ChatResponseMessage(content=whole.text),
        logprobs=_logprobs(whole.logprobs) if body.logprobs else None,
        finish_reason=responses.finish(whole.finish_reason),
    )
    return ChatCompletionResponse(
        id=reply.id,
        model=body.model,
        choices=[choice],
        usage=responses.usage(whole),
        ttt=TTTInfo.of(reply.started.ttt),
    ).model_dump(mode="json")


def _logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=responses.token_bytes(e.token),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=responses.token_bytes(t)) for _, t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


def _stream(reply: responses.Answer, body: ChatCompletionRequest, timer: responses.StreamTimer):
    ttt = TTTInfo.of(reply.started.ttt)

    def chunk(choices, **extra) -> str:
        return responses.event(ChatCompletionChunk(id=reply.id, model=body.model, choices=choices, **extra))

    async def stream():
        yield chunk([ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        async for piece in reply.events:
            timer.saw(piece)
            logprobs = _logprobs(piece.logprobs) if body.logprobs else None
            if piece.final:
                delta = DeltaMessage(content=piece.text) if piece.text else DeltaMessage()
                last = ChatCompletionChunkChoice(
                    delta=delta, logprobs=logprobs, finish_reason=responses.finish(piece.finish_reason)
                )
                yield chunk([last], ttt=None if body.include_usage else ttt)
                if body.include_usage:
                    yield chunk([], usage=responses.usage(piece), ttt=ttt)
            elif piece.text or piece.logprobs:
                yield chunk(
                    [ChatCompletionChunkChoice(delta=DeltaMessage(content=piece.text), logprobs=logprobs)]
                )
        timer.done(reply.started)

    return responses.guarded(stream)
