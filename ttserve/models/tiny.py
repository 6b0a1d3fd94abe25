"""The embedded default language model: a tiny Llama pretrained on the Python standard library.

No model hub is reachable on the machines ttserve is developed and tested on, yet every part of the server
(LoRA test-time training, vLLM and transformers engines, bits-per-byte evaluation) needs a causal LM and its
tokenizer. This module makes one, reproducibly, from text that is on every machine: the sources of the
standard library. Real deployments point the configuration at any Hugging Face model instead.

What it is pretrained on matters. The embedded default *datastore* is built from top-level stdlib modules,
and evaluation scores held-out text of that kind. So the model is pretrained only on the stdlib *packages*
(asyncio/, email/, json/, ...): it learns Python and the library's style, but the retrieved top-level-module
text is new to it, and test-time training on it can show a gain. ttserve/stdlib_corpus.py owns both halves
of that split.

The result is a plain Hugging Face directory (safetensors weights, tokenizer files, generation config) that
`AutoModelForCausalLM` / `AutoTokenizer` / vLLM load like any other, plus `ttserve_model.json`, which records
the configuration, a fingerprint of the corpus and the training statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ttserve import __version__
from ttserve.config import cache_dir
from ttserve.files import staged_directory
from ttserve.scoring import bits_per_byte
from ttserve.stdlib_corpus import pretraining_files, stdlib_root

log = logging.getLogger(__name__)

# Bump when the layout of the directory or the meaning of a recorded field changes; it is part of the
# default directory's name, so an old cache entry is never mistaken for a current one.
FORMAT_VERSION = 1
MODEL_INFO_FILE = "ttserve_model.json"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Chat-role markers, so that chat completions can be served with the tokenizer's chat template.
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]  # ids 0..5, in this order

# One turn is `<|role|>\n` + content + `<|eos|>`; the whole conversation starts with `<|bos|>`, like every
# pretraining document. Generation stops at `<|eos|>`, which therefore also ends the assistant's turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


class TinyModelConfig(BaseModel):
    """Everything that determines the built model: equal configs give equal builds on the same machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Architecture. head_dim = hidden_size / num_heads must be a size vLLM's CPU attention backend supports
    # (32, 64, 80, 96, 112, 128, ...), so the default keeps it at 64.
    vocab_size: PositiveInt = 4096
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 1024
    rope_theta: float = 10_000.0

    # Pretraining. The default is sized to build in a few minutes on a 2-core CPU while seeing the package
    # corpus about twice; of the peak learning rates tried, the largest gave the lowest validation loss
    # (BENCHMARKS.md, "The embedded default model").
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 16
    train_steps: PositiveInt = 500
    learning_rate: float = 5e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of learning_rate
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.02
    eval_every: PositiveInt = 100  # validation loss is logged this often (and at the end)
    seed: int = 0
    # Cap on the corpus, in bytes of source; files are taken in path order while they fit, so the cap
    # selects the same files on every machine with the same Python version. None: every package file.
    max_corpus_bytes: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError("seq_len must not exceed max_position_embeddings")
        if not 0 <= self.warmup_steps < self.train_steps:
            raise ValueError("warmup_steps must be in [0, train_steps)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def quick(cls, **overrides: object) -> TinyModelConfig:
        """A preset for tests: the same pipeline at toy scale, built in seconds rather than minutes."""
        values: dict[str, object] = dict(
            vocab_size=1024,
            hidden_size=64,
            num_layers=2,
            num_heads=1,  # head_dim stays 64
            intermediate_size=192,
            seq_len=128,
            batch_size=16,
            train_steps=150,
            learning_rate=2.5e-3,
            warmup_steps=15,
            eval_every=75,
            max_corpus_bytes=1_000_000,
        )
        values.update(overrides)
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: list[Path]  # relative to root, in the (deterministic) order they are used
    texts: list[str]
    sha256: str  # of the concatenated raw bytes of `files`, in order

    @property
    def total_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)

    def fingerprint(self) -> dict[str, object]:
        return {
            "python_version": platform.python_version(),
            "stdlib": str(self.root),
            "sha256": self.sha256,
            "total_bytes": self.total_bytes,
            "files": [
                {"path": f.as_posix(), "bytes": len(t.encode("utf-8"))}
                for f, t in zip(self.files, self.texts, strict=True)
            ],
        }


def load_corpus(max_bytes: int | None = None) -> Corpus:
    """The pretraining half of the stdlib (ttserve/stdlib_corpus.py), read in order and fingerprinted."""
    root = stdlib_root()
    files = [path.relative_to(root) for path in pretraining_files(max_bytes, root)]
    digest = hashlib.sha256()
    texts = []
    for rel in files:
        raw = (root / rel).read_bytes()
        digest.update(raw)
        # The stdlib is UTF-8; `replace` only keeps an odd distribution's file from stopping the build.
        texts.append(raw.decode("utf-8", errors="replace"))
    if not texts:
        raise RuntimeError(f"no standard-library package sources found under {root}")
    return Corpus(root, files, texts, digest.hexdigest())


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], config: TinyModelConfig) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers.

    Byte-level: the base alphabet is the 256 bytes, so any UTF-8 text (code, emoji, Chinese) encodes and
    decodes back exactly; there is no unknown token. Training is deterministic for a given input order.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    # No prefix space: " def" and "def" stay distinct tokens, and decode(encode(x)) == x for every x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Every pretraining document starts with <|bos|>, so encoding a prompt does too: what the model sees at
    # inference (transformers or vLLM, both add special tokens by default) matches what it was trained on.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=config.max_position_embeddings,
        # Decoding must return the exact text: no clean-up of spaces before punctuation.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """UTF-8 bytes each token id stands for: the denominator of bits per byte (spec §5).

    In a byte-level BPE vocabulary every character of a token's string stands for exactly one byte, so the
    length of the string is the byte count. Special tokens stand for no text.
    """
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in special:
            lengths[idx] = len(token)
    return lengths


def pack_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """The corpus as one token stream, `<|bos|> doc <|eos|>` per document, cut into [n, seq_len] blocks."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream += [tokenizer.bos_token_id, *encoding.ids, tokenizer.eos_token_id]
    n = len(stream) // seq_len  # the ragged tail is dropped
    if n < 2:
        raise RuntimeError(f"corpus too small: {len(stream)} tokens, fewer than two blocks of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---------------------------------------------------------------------------------------------------------
# Model and pretraining


def new_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama: the architecture vLLM and PEFT's LoRA support best."""
    llama = LlamaConfig(
        # The BPE trainer may stop short of the requested size on a small corpus: use what it produced.
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=1e-5,
        # Input and output embeddings shared: at this size they would otherwise be half the parameters.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(config.seed)  # the initial weights are part of what makes builds reproducible
    model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@dataclass
class TrainingStats:
    steps: int
    seconds: float
    parameters: int
    train_blocks: int
    val_blocks: int
    tokens_seen: int
    final_train_loss: float  # mean over the last (up to) 20 steps: one step's loss is noisy
    final_val_loss: float
    val_bits_per_byte: float
    uniform_loss: float  # ln(vocab): the loss of predicting uniformly, for comparison


def _lr_lambda(config: TinyModelConfig):
    """Linear warmup to the peak, then a cosine down to min_lr_ratio of it."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(model: torch.nn.Module, config: TinyModelConfig) -> torch.optim.AdamW:
    # Decay matrices only; decaying norm gains would pull them towards zero for no benefit.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def _train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: torch.Tensor,
    grad_clip: float,
) -> float:
    """One optimiser step on a [batch, seq_len] block of token ids; returns its mean token loss."""
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, blocks: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean next-token loss (nats) and bits per byte over `blocks`.

    Every token after the first of a block is predicted once. Bits per byte divides the summed loss by the
    UTF-8 bytes those predicted tokens stand for; the loss on <|bos|>/<|eos|> counts, their bytes are zero.
    """
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nats = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total_nats += nats.item()
        total_tokens += targets.numel()
        total_bytes += int(byte_lengths[targets].sum())
    model.train(was_training)
    return total_nats / total_tokens, bits_per_byte(-total_nats, total_bytes)


def pretrain(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    byte_lengths: torch.Tensor,
    config: TinyModelConfig,
    progress: bool = True,
) -> TrainingStats:
    """Train on all but a held-out ~val_fraction of `blocks`; every random choice comes from config.seed."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(blocks), generator=generator)
    n_val = max(1, round(len(blocks) * config.val_fraction))
    # Sorted, so that the held-out set is a property of the corpus and seed, not of the permutation's order.
    val = blocks[order[:n_val].sort().values]
    train = blocks[order[n_val:].sort().values]
    if len(train) < config.batch_size:
        raise RuntimeError(f"only {len(train)} training blocks for a batch of {config.batch_size}")

    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    model.train()
    losses: list[float] = []
    val_loss = val_bpb = float("nan")
    epoch_order = torch.empty(0, dtype=torch.long)
    started = time.perf_counter()
    bar = tqdm(range(config.train_steps), desc="pretraining tiny model", unit="step", disable=not progress)
    for step in bar:
        # Epochs of shuffled blocks; a new permutation whenever the current one runs out of full batches.
        offset = (step * config.batch_size) % (len(train) // config.batch_size * config.batch_size)
        if offset == 0:
            epoch_order = torch.randperm(len(train), generator=generator)
        batch = train[epoch_order[offset : offset + config.batch_size]]
        losses.append(_train_step(model, optimizer, scheduler, batch, config.grad_clip))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.train_steps:
            val_loss, val_bpb = evaluate(model, val, byte_lengths, config.batch_size)
            log.info(
                "step %d: train loss %.3f, val loss %.3f, val bpb %.3f",
                step + 1,
                losses[-1],
                val_loss,
                val_bpb,
            )
        bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{val_loss:.3f}")
    bar.close()
    model.eval()
    return TrainingStats(
        steps=config.train_steps,
        seconds=round(time.perf_counter() - started, 2),
        parameters=sum(p.numel() for p in model.parameters()),
        train_blocks=len(train),
        val_blocks=len(val),
        tokens_seen=config.train_steps * config.batch_size * config.seq_len,
        final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
        final_val_loss=val_loss,
        val_bits_per_byte=val_bpb,
        uniform_loss=math.log(model.config.vocab_size),
    )


# ---------------------------------------------------------------------------------------------------------
# Building, atomically, and the default location


def build_tiny_model(
    out_dir: str | Path, config: TinyModelConfig | None = None, progress: bool = True
) -> Path:
    """Train the tokenizer and the model and write them to `out_dir`, which must not exist yet.

    Everything is written to a staging directory beside `out_dir` and renamed into place at the end, so an
    interrupted or failed build never leaves a half-written model directory.
    """
    config = config or TinyModelConfig()
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    started = time.perf_counter()
    corpus = load_corpus(config.max_corpus_bytes)
    log.info("tiny model: %d stdlib package files, %d bytes", len(corpus.files), corpus.total_bytes)
    tokenizer = train_tokenizer(corpus.texts, config)
    blocks = pack_blocks(corpus.texts, tokenizer, config.seq_len)
    byte_lengths = token_byte_lengths(tokenizer)
    model = new_model(config, tokenizer)
    with staged_directory(out) as staging:
        stats = pretrain(model, blocks, byte_lengths, config, progress)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {
            "format_version": FORMAT_VERSION,
            "config": config.model_dump(mode="json"),
            "corpus": corpus.fingerprint(),
            "training": {**stats.__dict__, "build_seconds": round(time.perf_counter() - started, 2)},
            "versions": {
                "ttserve": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
        }
        (staging / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "tiny model built in %.0f s: val loss %.3f, %.3f bits per byte -> %s",
        info["training"]["build_seconds"],
        stats.final_val_loss,
        stats.val_bits_per_byte,
        out,
    )
    return out


def read_model_info(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text())


def default_model_dir(config: TinyModelConfig | None = None) -> Path:
    """Where the embedded default model lives: one directory per config and Python version.

    The Python version is in the name because it selects the corpus (the stdlib sources differ between
    versions); the config and format version because they determine everything else.
    """
    config = config or TinyModelConfig()
    key = json.dumps(
        {
            "config": config.model_dump(mode="json"),
            "python": platform.python_version(),
            "format": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return cache_dir() / "models" / f"tiny-stdlib-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_tiny_model(
    out_dir: str | Path | None = None, config: TinyModelConfig | None = None, progress: bool = True
) -> Path:
    """The tiny model's directory (by default `default_model_dir(config)`), built first if it is missing."""
    config = config or TinyModelConfig()
    out = Path(out_dir) if out_dir is not None else default_model_dir(config)
    if not (out / MODEL_INFO_FILE).is_file():
        try:
            return build_tiny_model(out, config, progress)
        except FileExistsError:
            # Another process finished the same build first: use its result if it is complete.
            if not (out / MODEL_INFO_FILE).is_file():
                raise
    built_with = read_model_info(out)["config"]
    if built_with != config.model_dump(mode="json"):
        raise ValueError(f"{out} holds a tiny model built with a different config: {built_with}")
    return out
