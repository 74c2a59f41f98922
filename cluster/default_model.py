"""The built-in default model (a tiny Llama with seeded random weights and a real byte-level
BPE tokenizer, built on first use in a local cache) and folders for real model shapes.
Runs on the driver; needs torch, safetensors and tokenizers, never Ray or transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_MODEL_NAME = "shardserve-tiny-llama"
# Bump when the build changes in a way the corpus and config hash cannot see (init, trainer).
BUILD_VERSION = "v1"
SEED = 0
VOCAB_SIZE = 1536  # 8 special tokens + 256 bytes + 1272 merges; divisible by tp 1, 2, 4, 8
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
)
BOS_TOKEN, END_OF_TEXT_TOKEN, EOT_TOKEN, PAD_TOKEN = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
)

_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
_MODELS_DIR = _CONFIGS_DIR / "models"
_CORPUS_PATH = _CONFIGS_DIR / "tiny_corpus.txt"
_TINY_CONFIG_PATH = _MODELS_DIR / f"{DEFAULT_MODEL_NAME}.json"
# Llama 3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def cache_dir() -> Path:
    """$SHARDSERVE_CACHE_DIR if set, else ~/.cache/shardserve (read on every call)."""
    configured = os.environ.get("SHARDSERVE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shardserve"


def default_model_path() -> Path:
    """Folder of the built-in tiny model, built on first use (a few seconds).

    The folder name carries a hash of the corpus and config, so editing either builds a
    fresh folder instead of reusing a stale one."""
    fingerprint = hashlib.sha256(
        BUILD_VERSION.encode() + _CORPUS_PATH.read_bytes() + _TINY_CONFIG_PATH.read_bytes()
    ).hexdigest()[:10]
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{BUILD_VERSION}-{fingerprint}"
    return _publish(target, build_default_model)


def build_default_model(out_dir: str | Path) -> None:
    """Writes the tiny model's files into an existing folder: tokenizer.json,
    tokenizer_config.json, config.json, generation_config.json, model.safetensors."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = _model_config(tokenizer)
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation)
    save_file(init_weights(config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on configs/tiny_corpus.txt; the same bytes every run."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any text (emoji included) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise ValueError(
            f"{_CORPUS_PATH} yields {tokenizer.get_vocab_size()} tokens, fewer than "
            f"{VOCAB_SIZE}: add more varied text to it"
        )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Prepends BOS to every encoded text, as Llama 3's tokenizer.json does.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        ),
    ])
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": PAD_TOKEN,
        # Cleanup would rewrite " ." as "." and make window decodes disagree with full ones.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": _CHAT_TEMPLATE,
    }


def _model_config(tokenizer: Tokenizer) -> dict:
    """configs/models/shardserve-tiny-llama.json plus the ids the tokenizer assigned."""
    config = json.loads(_TINY_CONFIG_PATH.read_text())
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["bos_token_id"] = tokenizer.token_to_id(BOS_TOKEN)
    config["eos_token_id"] = [tokenizer.token_to_id(t) for t in (END_OF_TEXT_TOKEN, EOT_TOKEN)]
    config["pad_token_id"] = tokenizer.token_to_id(PAD_TOKEN)
    return config


def init_weights(config: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights under Hugging Face Llama names.

    Unit-scale embeddings, 1/sqrt(fan_in) projections and a 3/sqrt(hidden) lm_head give
    logits with std ~3: greedy picks are decisive yet depend on the context."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_size = config["num_attention_heads"] * config["head_dim"]
    kv_size = config["num_key_value_heads"] * config["head_dim"]
    vocab = config["vocab_size"]
    generator = torch.Generator().manual_seed(seed)

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * std

    weights = {"model.embed_tokens.weight": normal(vocab, hidden, 1.0)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        for name, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            weights[f"{prefix}.self_attn.{name}.weight"] = normal(rows, hidden, hidden**-0.5)
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(hidden, q_size, q_size**-0.5)
        weights[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden)
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(inter, hidden, hidden**-0.5)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(inter, hidden, hidden**-0.5)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(hidden, inter, inter**-0.5)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden, 3.0 * hidden**-0.5)
    return weights


def shape_names() -> list[str]:
    """Real model shapes shipped in configs/models (config.json content, no weights)."""
    return sorted(p.stem for p in _MODELS_DIR.glob("*.json") if p != _TINY_CONFIG_PATH)


def model_shape_path(name: str) -> Path:
    """Folder `<cache>/shapes/<name>/` holding only config.json, for load_format="dummy"."""
    if name not in shape_names():
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(shape_names())}")
    content = (_MODELS_DIR / f"{name}.json").read_bytes()
    target = cache_dir() / "shapes" / name
    config_path = target / "config.json"
    if config_path.is_file() and config_path.read_bytes() == content:
        return target
    target.mkdir(parents=True, exist_ok=True)
    # Write beside, then replace: a concurrent reader sees the old file or the new, never half.
    fd, tmp_name = tempfile.mkstemp(prefix=".config.", dir=target)
    with os.fdopen(fd, "wb") as tmp:
        tmp.write(content)
    os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600
    os.replace(tmp_name, config_path)
    return target


def _publish(target: Path, build: Callable[[Path], None]) -> Path:
    """Builds into a temp folder beside `target`, then renames it into place atomically.

    Whoever renames first wins; a loser finds `target` complete and drops its own build,
    so racing processes all return the same, whole folder."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(folder: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600; caches may be shared.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
