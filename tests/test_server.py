"""The OpenAI-compatible server end to end, in process (no Ray), through the official `openai` client.

The Ray Serve deployment of the same API is tested in test_ray_app.py.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pydantic import SecretStr

from tests.serving import CODE_PROMPT, ServerThread, chat, ttt_of

pytestmark = pytest.mark.slow


# --- the API --------------------------------------------------------------------------------------------
def test_models_and_health(running):
    models = running.client().models.list()
    assert [m.id for m in models.data] == ["tiny-test"]
    assert httpx.get(f"{running.url}/health").json() == {"status": "ok"}
    assert running.client().models.retrieve("tiny-test").id == "tiny-test"


def test_chat_with_budget_zero_does_not_train(running):
    response = chat(running, extra_body={"compute_budget": 0})
    ttt = ttt_of(response)
    assert ttt["trained"] is False and ttt["steps"] == 0 and ttt["decision"] == "skipped"
    assert ttt["reason"] == "compute budget is 0" and ttt["budget"] == 0
    assert response.choices[0].message.content
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_with_a_budget_trains_within_it_and_reuses_the_adapter(running):
    body = {"compute_budget": 3, "ttt": {"mode": "always"}}
    first = ttt_of(chat(running, extra_body=body))
    assert first["trained"] is True and first["decision"] == "trained" and 0 < first["steps"] <= 3
    assert first["training_tokens"] > 0 and first["training_seconds"] > 0
    assert len(first["selected_ids"]) == 8 and first["adapter_id"]
    assert first["uncertainty_after"] < first["uncertainty_before"]
    again = ttt_of(chat(running, extra_body=body))
    assert again["decision"] == "reused" and again["cached"] is True
    assert again["adapter_id"] == first["adapter_id"] and again["selected_ids"] == first["selected_ids"]


def test_training_changes_the_answer_and_the_base_answer_is_unaffected(running):
    base = chat(running, extra_body={"compute_budget": 0}).choices[0].message.content
    adapted = chat(running, extra_body={"compute_budget": 8, "ttt": {"mode": "always"}})
    assert ttt_of(adapted)["steps"] == 8
    assert chat(running, extra_body={"compute_budget": 0}).choices[0].message.content == base


def test_training_gets_the_cpus_and_every_other_torch_thread_one(running):
    """The replica's CPU split (ttserve/threads.py): training steps run with the training thread's count,
    and inference passes and query embedding with one thread, so they build no OpenMP team of their own."""
    import torch

    from ttserve.threads import default_torch_threads

    trained = running.replica.pipeline.trainer.model.get_base_model()  # the training tree
    served = running.replica.pipeline.engine.model.get_base_model()  # the serving tree (shared_model.py)
    embedder = running.replica.retrieve.__self__.embedder.model
    seen: list[tuple[str, int]] = []
    hooks = [
        trained.register_forward_pre_hook(
            lambda module, args: seen.append(("training", torch.get_num_threads()))
        ),
        served.register_forward_pre_hook(
            lambda module, args: seen.append(("inference", torch.get_num_threads()))
        ),
        embedder.register_forward_pre_hook(
            lambda module, args: seen.append(("embedding", torch.get_num_threads()))
        ),
    ]
    try:
        response = chat(
            running,
            "A question no other test asks: what is a CPU split?",
            extra_body={"compute_budget": 2, "ttt": {"mode": "always"}},
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert ttt_of(response)["decision"] == "trained"
    counts = {kind: {n for k, n in seen if k == kind} for kind in ("training", "inference", "embedding")}
    assert counts == {"training": {default_torch_threads()}, "inference": {1}, "embedding": {1}}
    assert running.settings.training.cpu_threads is None and running.settings.engine.cpu_threads == 1


def test_streaming_deltas_equal_the_whole_answer(running):
    client = running.client()
    kwargs = dict(model=running.model, prompt=CODE_PROMPT, max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs, extra_body={"compute_budget": 2, "ttt": {"mode": "always"}})
    chunks = list(
        client.completions.create(
            **kwargs, stream=True, extra_body={"compute_budget": 2, "ttt": {"mode": "always"}}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert ttt_of(chunks[-1])["adapter_id"] == ttt_of(whole)["adapter_id"]
    assert all("ttt" not in (c.model_extra or {}) for c in chunks[:-1])


def test_chat_streaming_with_usage(running):
    stream = running.client().chat.completions.create(
        model=running.model,
        messages=[{"role": "user", "content": CODE_PROMPT}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"compute_budget": 0},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert ttt_of(chunks[-1])["reason"] == "compute budget is 0"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat(running, max_tokens=10, extra_body={"compute_budget": 0}).choices[0].message.content


def test_echo_logprobs_scores_the_prompt(running):
    """The request lm-evaluation-harness's local-completions model sends for loglikelihoods."""
    import torch
    from transformers import AutoModelForCausalLM

    engine = running.replica.pipeline.engine
    ids = engine.encode("import os\nimport sys\n")
    response = running.client().completions.create(
        model=running.model, prompt=ids, max_tokens=0, echo=True, logprobs=1, extra_body={"compute_budget": 0}
    )
    logprobs = response.choices[0].logprobs
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids)
    model = AutoModelForCausalLM.from_pretrained(running.settings.model.name_or_path).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)[:-1].gather(
            1, torch.tensor(ids[1:])[:, None]
        )[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]), expected, atol=2e-4, rtol=1e-4)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert response.choices[0].text == "".join(logprobs.tokens)
    text = running.client().completions.create(
        model=running.model, prompt="import os\n", max_tokens=3, echo=True, temperature=0,
        extra_body={"compute_budget": 0},
    )  # fmt: skip
    assert text.choices[0].text.startswith("import os\n")


def test_generated_logprobs_in_chat(running):
    response = chat(running, logprobs=True, top_logprobs=2, extra_body={"compute_budget": 0})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


# --- bad input -----------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny-test", "messages": [', 400, None),
    ("wrong type", "/v1/chat/completions", {"model": "tiny-test", "messages": "hi"}, 400, "messages"),
    ("negative budget", "/v1/completions", {"model": "tiny-test", "prompt": "x", "compute_budget": -1}, 400, "compute_budget"),
    ("huge budget", "/v1/completions", {"model": "tiny-test", "prompt": "x", "compute_budget": 10**6}, 400, "compute_budget"),
    ("fractional budget", "/v1/completions", {"model": "tiny-test", "prompt": "x", "compute_budget": 2.5}, 400, "compute_budget"),
    ("misspelt field", "/v1/completions", {"model": "tiny-test", "prompt": "x", "compute_bugdet": 2}, 400, "compute_bugdet"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("over the context", "/v1/completions", {"model": "tiny-test", "prompt": "x " * 3000}, 400, "prompt"),
    ("max_tokens past the context", "/v1/completions", {"model": "tiny-test", "prompt": "x", "max_tokens": 10**6}, 400, "prompt"),
    ("n > 1", "/v1/chat/completions", {"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("penalty out of range", "/v1/completions", {"model": "tiny-test", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("bad ttt knob", "/v1/completions", {"model": "tiny-test", "prompt": "x", "ttt": {"strategy": "random"}}, 400, "ttt.strategy"),
    ("token out of vocabulary", "/v1/completions", {"model": "tiny-test", "prompt": [1, 10**7]}, 400, "prompt"),
    ("temperature", "/v1/completions", {"model": "tiny-test", "prompt": "x", "temperature": 5}, 400, "temperature"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "path", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_input_is_a_clear_openai_error(running, case, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{running.url}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_penalties_reach_the_model_through_the_official_client(running):
    client = running.client()

    def complete(budget: int, **penalties) -> tuple[list[str], str]:
        response = client.completions.create(
            model=running.model, prompt=CODE_PROMPT, max_tokens=24, temperature=0, logprobs=0, **penalties,
            extra_body={"compute_budget": budget, "ttt": {"mode": "always"}},
        )  # fmt: skip
        return response.choices[0].logprobs.tokens, ttt_of(response)["decision"]

    for budget in (0, 2):  # the base model, then an adapter (trained, then reused with the penalty)
        plain, _ = complete(budget)
        penalized, decision = complete(budget, frequency_penalty=2.0, presence_penalty=0.5)
        assert decision == ("skipped" if budget == 0 else "reused")
        assert len(set(penalized)) > len(set(plain))  # fewer repeated tokens
        assert complete(budget) == (plain, decision)  # nothing carried over to the next request


def test_the_server_serves_correctly_after_bad_input(running):
    before = chat(running, extra_body={"compute_budget": 0}).choices[0].message.content
    for _, path, body, _, _ in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{running.url}{path}", content=content, headers={"content-type": "application/json"})
    assert chat(running, extra_body={"compute_budget": 0}).choices[0].message.content == before
    with pytest.raises(openai.NotFoundError):
        running.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert httpx.get(f"{running.url}/v1/nothing-here").status_code == 404


def test_auth_size_limit_and_concurrency_limit(running, monkeypatch):
    """A second API over the same generator, with an API key, a small body limit and one request at a time."""
    import threading

    from ttserve.serving.api import build_api

    server_config = running.settings.server.model_copy(
        update={"api_key": SecretStr("s3cret"), "max_request_bytes": 2000, "max_concurrent_requests": 1}
    )
    settings = running.settings.model_copy(update={"server": server_config})
    server = ServerThread(build_api(running.replica, settings))
    # The real trainer, held at its start until the checks below are done, so "while it trains" is a fact
    # of the test rather than a race against the trainer's speed.
    release = threading.Event()
    real_train = running.replica.pipeline.trainer.train

    def held_train(*args, **kwargs):
        assert release.wait(60)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(running.replica.pipeline.trainer, "train", held_train)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "tiny-test"
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        with pytest.raises(openai.APIStatusError) as too_large:
            client.completions.create(model="tiny-test", prompt="x" * 5000)
        assert too_large.value.status_code == 413

        def training_request():
            return client.completions.create(
                model="tiny-test", prompt="class Registry:\n    def register(self):", max_tokens=4,
                extra_body={"compute_budget": 3, "ttt": {"mode": "always"}},
            )  # fmt: skip

        with ThreadPoolExecutor(1) as pool:
            training = pool.submit(training_request)
            deadline = time.monotonic() + 60
            while running.replica.pipeline.training.queued == 0:  # admitted and held in the trainer
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as limited:
                client.completions.create(model="tiny-test", prompt="x", max_tokens=1)
            assert limited.value.response.headers["retry-after"] == "1"  # backpressure says when
            health = httpx.get(f"{server.url}/health")  # answered while the generator trains
            assert health.status_code == 200 and not training.done()
            release.set()
            assert ttt_of(training.result())["trained"]
    finally:
        release.set()
        server.stop()


# --- test-time training faults and isolation --------------------------------------------------------------------
def test_a_training_fault_falls_back_to_the_base_model(running, monkeypatch):
    base = chat(running, extra_body={"compute_budget": 0}).choices[0].message.content

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(running.replica.pipeline.trainer, "train", broken)
    response = chat(running, extra_body={"compute_budget": 5, "ttt": {"mode": "always", "n": 5}})
    ttt = ttt_of(response)
    assert ttt["decision"] == "fallback" and ttt["trained"] is False and ttt["adapter_id"] is None
    assert (
        "training failed" in ttt["reason"] and "injected" in ttt["reason"] and "base model" in ttt["reason"]
    )
    assert response.choices[0].message.content == base


def test_a_deadline_too_short_for_training_serves_the_base_model(running):
    chat(
        running, extra_body={"compute_budget": 2, "ttt": {"mode": "always", "n": 3}}
    )  # the trainer's speed is known
    response = chat(
        running,
        content="an unrelated prompt",
        extra_body={"compute_budget": 30, "ttt": {"mode": "always", "deadline_s": 0.01}},
    )
    ttt = ttt_of(response)
    assert ttt["decision"] == "fallback" and "deadline" in ttt["reason"]


def test_concurrent_requests_each_get_their_own_adapter(running):
    prompts = [CODE_PROMPT, "class Cache:\n    def get(self, key):", "import json\n\ndef load(path):"]
    budgets = [4, 6, 0]

    def ask(prompt, budget):
        response = chat(
            running, content=prompt, extra_body={"compute_budget": budget, "ttt": {"mode": "always"}}
        )
        return response.choices[0].message.content, ttt_of(response)

    alone = [ask(p, b) for p, b in zip(prompts, budgets, strict=True)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts * 2, budgets * 2))
    for (text, ttt), (text_alone, ttt_alone) in zip(together, alone * 2, strict=True):
        assert text == text_alone and ttt["adapter_id"] == ttt_alone["adapter_id"]
    assert len({ttt["adapter_id"] for _, ttt in alone}) == 3  # two adapters and None


def pause_after_first_chunk(engine, monkeypatch) -> threading.Event:
    """The real engine, paused after each answer's first chunk until the returned event is set."""
    import asyncio

    real_generate = engine.generate
    release = threading.Event()

    async def held_after_first_chunk(*args, **kwargs):
        first = True
        async for chunk in real_generate(*args, **kwargs):
            yield chunk
            if first:
                first = False
                await asyncio.to_thread(release.wait, 60)

    monkeypatch.setattr(engine, "generate", held_after_first_chunk)
    return release


def test_a_streamed_request_is_in_flight_until_its_last_byte(running, monkeypatch):
    release = pause_after_first_chunk(running.replica.pipeline.engine, monkeypatch)

    def in_flight() -> str:
        text = httpx.get(f"{running.url}/metrics").text
        return next(line for line in text.splitlines() if line.startswith("ttserve_requests_in_flight "))

    try:
        stream = iter(chat(running, stream=True, extra_body={"compute_budget": 0}))
        next(stream)  # headers and the first chunk are out; the rest is still being generated
        assert in_flight() == "ttserve_requests_in_flight 1.0"
    finally:
        release.set()
    assert list(stream)[-1].choices[0].finish_reason  # the rest of the answer arrives after the release
    assert in_flight() == "ttserve_requests_in_flight 0.0"


def test_a_full_replica_answers_503_with_retry_after_at_once_and_serves_again(running, monkeypatch):
    """Admission for generations (ttserve/admission.py), one slot and no queue: while a stream holds the slot,
    another request is refused at once with an OpenAI-style 503 and Retry-After, not queued until it times
    out; once the slot is free the same request is answered."""

    from ttserve.admission import GenerationSlots

    pipeline = running.replica.pipeline
    monkeypatch.setattr(pipeline, "slots", GenerationSlots(slots=1, max_waiting=0, max_wait_s=30))
    release = pause_after_first_chunk(pipeline.engine, monkeypatch)
    body = {"model": running.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        stream = iter(chat(running, stream=True, extra_body={"compute_budget": 0}))
        next(stream)  # holds the only slot
        refused = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "service_unavailable" and "at capacity" in error["message"]
    finally:
        release.set()
    assert list(stream)[-1].choices[0].finish_reason
    assert "ttserve_generator_generations_refused_total 1.0" in httpx.get(f"{running.url}/metrics").text
    assert httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_metrics_count_requests_and_training(running):
    chat(running, extra_body={"compute_budget": 1, "ttt": {"mode": "always"}})
    text = httpx.get(f"{running.url}/metrics").text
    assert 'ttserve_requests_total{endpoint="chat",status="200"}' in text
    assert 'ttserve_ttt_decisions_total{decision="trained"}' in text
    assert "ttserve_training_steps_total" in text and "ttserve_request_seconds_bucket" in text
    assert (
        'ttserve_adapter_cache_total{result="hit"}' in text
        or 'ttserve_adapter_cache_total{result="miss"}' in text
    )


def test_a_cancelled_request_stops_its_training_and_leaves_nothing_behind(running, loop_thread, monkeypatch):
    """What Ray Serve does when a client disconnects: the generator's stream is cancelled mid-training."""
    import asyncio

    from ttserve.contract import GenerateRequest

    pipeline = running.replica.pipeline
    runs, training_started = [], threading.Event()
    real_train = pipeline.trainer.train

    def recording_train(*args, **kwargs):  # the real trainer; only remember how its run ended
        training_started.set()
        runs.append(real_train(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(pipeline.trainer, "train", recording_train)
    request = GenerateRequest(
        prompt="class Registry:\n    def register(self, name):",
        max_tokens=4,
        compute_budget=24,
        mode="always",
        n=24,
    )

    async def cancel_during_training():
        task = asyncio.ensure_future(anext(pipeline.stream(request)))
        assert await asyncio.to_thread(training_started.wait, 60)  # admitted, and the trainer has begun
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop_thread.run(cancel_during_training())
    assert runs[-1].stopped == "cancelled" and runs[-1].steps < 24
    assert pipeline.training.queued == 0 and pipeline.training.queued_steps == 0
    cached = {adapter.path.name for adapter in pipeline.adapters.adapters()}
    assert {p.name for p in pipeline.adapters.directory.iterdir()} == cached  # no half-written adapter
    again = chat(
        # 7 steps: no other request to this shared server trains that many, so its adapter cannot be cached.
        running,
        content="class Registry:",
        extra_body={"compute_budget": 7, "ttt": {"mode": "always"}},
    )
    assert ttt_of(again)["decision"] == "trained"  # the trainer is free


def test_chat_needs_a_chat_template_and_requests_wait_for_the_model(running, monkeypatch):
    engine = running.replica.pipeline.engine
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    response = httpx.post(
        f"{running.url}/v1/chat/completions",
        json={"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 422 and "chat template" in response.json()["error"]["message"]
    monkeypatch.undo()
    monkeypatch.setattr(running.replica, "pipeline", None)  # as while the replica is still loading
    with pytest.raises(openai.APIStatusError) as loading:
        chat(running)
    assert loading.value.status_code == 503
    monkeypatch.undo()
    assert chat(running, extra_body={"compute_budget": 0}).choices[0].message.content


def test_a_deadline_mid_training_answers_with_the_adapter_of_the_steps_taken(
    running, loop_thread, monkeypatch, tmp_path
):
    """The real trainer and engine: a deadline that falls during training leaves the adapter of the steps
    taken, which answers; its answer equals those steps trained alone at the planned run's rate, and a
    request planning exactly those steps (a larger rate) trains its own. Time is a clock that each
    training step advances by a second."""
    from contextlib import contextmanager

    from ttserve.contract import GenerateRequest, SamplingParams, collect
    from ttserve.pipeline import RequestPipeline

    parts = running.replica.pipeline
    shared, real_step = parts.trainer.shared, parts.trainer.shared.training_step
    clock = type("StepClock", (), {"now": 1000.0, "__call__": lambda self: self.now})()

    @contextmanager
    def one_second_step():
        with real_step() as model:
            yield model
        clock.now += 1.0

    monkeypatch.setattr(shared, "training_step", one_second_step)
    monkeypatch.setattr(parts.trainer, "clock", clock)
    pipeline = RequestPipeline(
        engine=parts.engine, trainer=parts.trainer, training=parts.planner.training, adapters=parts.adapters,
        policy=parts.planner.policy, retrieve=parts.planner.retrieve, limits=parts.limits, clock=clock,
    )  # fmt: skip
    prompt = "def checksum(data):\n    total = 0"
    greedy = SamplingParams(max_tokens=12, temperature=0)

    def ask(budget: int, deadline_s: float | None = None):
        request = GenerateRequest(
            prompt=prompt,
            sampling=greedy,
            max_tokens=12,
            compute_budget=budget,
            mode="always",
            deadline_s=deadline_s,
        )
        started, whole = loop_thread.run(pipeline.complete(request))
        return started.ttt, whole.text

    try:
        cut, text = ask(6, deadline_s=2.5)
        assert cut.decision == "trained" and (cut.steps, cut.planned_steps, cut.stopped) == (3, 6, "deadline")
        three, _ = ask(3)
        assert three.decision == "trained" and three.adapter_id != cut.adapter_id
        # The same three steps trained alone, outside the pipeline, at a 6-step plan's rate, answer the same.
        retrieval = loop_thread.run(parts.planner.retrieve(prompt, n=None, strategy=None, lam=None))
        with parts.trainer.session(planned_steps=6) as session:
            session.train(retrieval.texts[:3], 3)
            session.save(tmp_path / "alone")
        alone = loop_thread.run(parts.engine.add_adapter(tmp_path / "alone"))
        try:
            prompt_ids = parts.engine.encode(prompt)
            assert loop_thread.run(collect(parts.engine.generate(prompt_ids, greedy, alone))).text == text
        finally:
            loop_thread.run(parts.engine.remove_adapter(alone))
    finally:
        pipeline.close()


def test_adapters_are_not_shared_across_api_keys_unless_salting_is_off(running):
    """Adapter reuse is a timing side channel between tenants: with API keys, one key never gets an adapter
    another key trained (as vLLM's cache_salt keeps prefix-cache hits within a salt)."""
    from ttserve.serving.api import build_api

    def serve_with(**server):
        config = running.settings.server.model_copy(update=server)
        return ServerThread(
            build_api(running.replica, running.settings.model_copy(update={"server": config}))
        )

    def ask(server, key: str, prompt: str, **extra):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        response = client.completions.create(
            model="tiny-test", prompt=prompt, max_tokens=4, temperature=0,
            extra_body={"compute_budget": 2, "ttt": {"mode": "always"}, **extra},
        )  # fmt: skip
        return ttt_of(response)

    keys = {"api_key": SecretStr("key-a"), "api_keys": [SecretStr("key-b")]}
    salted = serve_with(**keys)
    shared = serve_with(**keys, salt_adapters_by_key=False)
    try:
        prompt = "def tenant_isolation(a, b):\n    return"
        a = ask(salted, "key-a", prompt)
        assert a["decision"] == "trained" and ask(salted, "key-a", prompt)["decision"] == "reused"
        b = ask(salted, "key-b", prompt)
        assert b["decision"] == "trained" and b["adapter_id"] != a["adapter_id"]
        assert b["selected_ids"] == a["selected_ids"]  # the same selection: only the salt differs
        # Salting off: the keys share adapters again; a request's own cache_salt still separates.
        prompt = "def shared_between_keys(a, b):\n    return"
        first = ask(shared, "key-a", prompt)
        assert ask(shared, "key-b", prompt)["adapter_id"] == first["adapter_id"]
        alone = ask(shared, "key-b", prompt, cache_salt="mine")
        assert alone["decision"] == "trained" and alone["adapter_id"] != first["adapter_id"]
    finally:
        salted.stop()
        shared.stop()


@pytest.mark.parametrize(
    ("where", "fault", "said"),
    [
        ("step", RuntimeError("a bug mid-step (injected)"), "test-time training failed (RuntimeError"),
        ("step", "oom", "test-time training failed (OutOfMemoryError"),
        ("save", OSError(28, "No space left on device"), "test-time training failed (OSError"),
    ],
)
def test_a_fault_in_real_training_falls_back_to_the_base_model_and_leaves_nothing(
    running, monkeypatch, where, fault, said
):
    """Faults injected into the real trainer (an exception, out of memory, a full scratch disk while the
    adapter is written): the base model answers and says why, nothing half-written is left in the scratch
    directory, and the next request trains normally."""
    import torch

    shared = running.replica.pipeline.trainer.shared
    error = torch.OutOfMemoryError("CUDA out of memory (injected)") if fault == "oom" else fault

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(shared, "training_step" if where == "step" else "save_training_adapter", broken)
    scratch = running.replica.pipeline.adapters.directory
    before = set(scratch.iterdir())
    prompt = f"def fault_{where}_{type(error).__name__}(items):\n    return"
    # The tiny corpus gives many prompts the same picks: a salt of its own keeps this adapter this test's.
    body = {"compute_budget": 2, "ttt": {"mode": "always"}, "cache_salt": f"{where}-{type(error).__name__}"}
    ttt = ttt_of(chat(running, content=prompt, extra_body=body))
    assert ttt["decision"] == "fallback" and said in ttt["reason"], ttt["reason"]
    assert ttt["reason"].endswith("answered with the base model") and ttt["adapter_id"] is None
    assert set(scratch.iterdir()) == before  # no half-written adapter
    monkeypatch.undo()
    assert ttt_of(chat(running, content=prompt, extra_body=body))["decision"] == "trained"


def test_under_concurrent_mixed_load_every_answer_equals_the_same_request_alone(running):
    """Base-model requests, trainings, repeats and different tenants at once, on one replica whose engine
    and trainer now run side by side: every answer (text and adapter) equals the same request's answer
    when it runs alone afterwards, so no request sees another's adapter or state."""
    requests = []
    for i in range(4):
        prompt = f"def mixed_load_{i}(values):\n    total ="
        requests += [
            {"prompt": prompt, "compute_budget": 0},
            {"prompt": prompt, "compute_budget": 2, "cache_salt": f"load-{i}"},
            {"prompt": prompt, "compute_budget": 2, "cache_salt": f"load-{i}"},  # a repeat: trains once
            {"prompt": prompt, "compute_budget": 3, "cache_salt": f"other-{i}"},
            {"prompt": prompt, "compute_budget": 2, "cache_salt": f"load-{i}", "frequency_penalty": 1.5},
        ]
    client = running.client()

    def ask(body: dict) -> tuple[str, str | None, str]:
        extra = {"ttt": {"mode": "always"}, **{k: v for k, v in body.items() if k != "prompt"}}
        response = client.completions.create(
            model=running.model, prompt=body["prompt"], max_tokens=10, temperature=0, extra_body=extra
        )
        ttt = ttt_of(response)
        return response.choices[0].text, ttt["adapter_id"], ttt["decision"]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, requests))
    assert {decision for _, _, decision in together} >= {"skipped", "trained"}
    for body, (text, adapter_id, _) in zip(requests, together, strict=True):
        alone_text, alone_adapter, alone_decision = ask(body)
        assert (alone_text, alone_adapter) == (text, adapter_id), body
        assert alone_decision == ("skipped" if body["compute_budget"] == 0 else "reused")
