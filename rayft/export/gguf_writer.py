"""Write a Llama-family safetensors model directory as one GGUF file (the `gguf` package).

Follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM`: the same tensor names, the same
metadata keys, 1-D tensors kept in f32, and q/k projections permuted from HF's rotary layout
(rotate-half: first half of each head's dims, then second half) to GGML's interleaved pairs.
Readers (llama.cpp, transformers' GGUF loader) undo that permutation, so a file without it loads
silently wrong; the round-trip verification catches exactly that.

Llama-3 models differ in two places, both handled as convert_hf_to_gguf.py does: the tokenizer
splits text with Llama-3's regex before byte-level BPE (tokenizer.ggml.pre "llama-bpe"), and
`rope_type: llama3` rescales the rotary frequencies, which GGUF carries as the per-dimension
divisors of the `rope_freqs.weight` tensor (there is no llama3 rope-scaling key).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from rayft import __version__
from rayft.export.card import Lineage
from rayft.export.errors import ExportError

GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")

# Llama-3's pre-tokenizer regex as its tokenizer.json spells it (llama.cpp's LLAMA_VOCAB_PRE_TYPE
# _LLAMA3 implements the same split). llama.cpp recognises it by hashing how a fixed text
# tokenizes, which only matches Meta's own vocabulary; a fine-tune with its own vocabulary shares
# the split, not the hash, so we recognise the split itself.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def permute_qk(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF rotate-half row order -> GGML interleaved order (llama.cpp's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _check_llama(config: dict, where: Path) -> None:
    if config.get("model_type") != "llama":
        raise ExportError(
            f"{where}: model_type is {config.get('model_type')!r}; GGUF export supports the "
            "Llama family (model_type 'llama') only"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ExportError(
                f"{where}: field '{flag}' is true; GGUF export of biased Llamas is not supported"
            )
    kind = _rope_type(_rope(config))
    if kind not in ("default", "llama3"):
        raise ExportError(
            f"{where}: rope type {kind!r}; GGUF export supports default and llama3 rope only"
        )


def _rope(config: dict) -> dict:
    """Rope settings wherever the config keeps them: transformers 5 writes `rope_parameters`
    (theta included), older files `rope_scaling` beside a top-level `rope_theta`."""
    return {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}


def _rope_type(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type")) or "default"


def llama3_rope_factors(config: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` for `rope_type: llama3`: per rotary dimension pair, the divisor of
    its base frequency (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, float32 as
    there). llama.cpp rotates pair i by pos * base^(-2i/d) / rope_freqs[i].

    One deliberate difference: convert_hf_to_gguf.py reads original_max_position_embeddings from
    the top level of config.json, where Llama-3.x configs do not put it, and falls back to 8192
    (right for Meta's models by coincidence). We read it where transformers does, from the rope
    settings, so a model with another original context gets the frequencies it was trained with.
    """
    rope = _rope(config)
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get(
        "original_max_position_embeddings", config.get("original_max_position_embeddings", 8192)
    )
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def tensor_type(name: str, shape: tuple[int, ...], ftype: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's choices: norms stay f32; rows that do not fill whole quant blocks stay f16."""
    qtype = GGUF_TYPES[ftype][1]
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return qtype
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    if ftype == "q4_0" and name in _EMBEDDINGS:
        # Embedding and output projection are the tensors most sensitive to 4 bits.
        return gguf.GGMLQuantizationType.Q8_0
    return qtype


def rounded(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`data` as a reader gets it back from a tensor of `qtype` (gguf's own (de)quantizer)."""
    return gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)


def shard_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: those its index names, when sharded (so a stray
    *.safetensors, an adapter copied in, is not read as weights), all of them present."""
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{model_dir}: no *.safetensors weights")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ExportError(
            f"{index}: not a safetensors index (no 'weight_map'); re-run `rayft merge`"
        ) from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
        raise ExportError(
            f"{index}: lists {len(missing)} shard(s) missing from {model_dir} ({missing[0]}, …): "
            "the model directory is incomplete; copy it again or re-run `rayft merge`"
        )
    return [model_dir / n for n in names]


def _tensors(model_dir: Path):
    for file in shard_files(model_dir):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)


def pre_tokenizer_name(pre: dict) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer, if it has one."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return None if pre.get("add_prefix_space") else "gpt-2"
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space")
    ):
        return "llama-bpe"
    return None


def _describe(pre: dict) -> str:
    if pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(p) for p in pre.get("pretokenizers", [])) + "]"
    return str(pre.get("type"))


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    where = model_dir / "tokenizer.json"
    if not where.exists():
        raise ExportError(f"{where}: missing; GGUF export needs the fast tokenizer's file")
    spec = json.loads(where.read_text())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    pre_name = pre_tokenizer_name(pre)
    if model.get("type") != "BPE" or pre_name is None:
        raise ExportError(
            f"{where}: GGUF export supports byte-level BPE tokenizers with GPT-2 pre-tokenization "
            "(ByteLevel, use_regex true, no prefix space) or Llama-3's (Sequence[Split(Llama-3 "
            f"regex, isolated), ByteLevel(use_regex false)]); this one is {model.get('type')} / "
            f"{_describe(pre)}. Export it with llama.cpp's convert_hf_to_gguf.py instead"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = (
                gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tok.bos_token_id, writer.add_bos_token_id),
        (tok.eos_token_id, writer.add_eos_token_id),
        (tok.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _add_lineage(writer: gguf.GGUFWriter, lineage: Lineage) -> None:
    """general.* keys as llama.cpp's gguf.Metadata writes them, and rayft.* keys for the rest of
    the run's lineage (the model card's table). No paths: they mean nothing on another machine,
    so neither general.source.* (the source is a local directory) nor the adapter's location."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(lineage.name)
    writer.add_basename(lineage.name)
    writer.add_description(f"{lineage.method} fine-tune of {lineage.base_name}, exported by rayft")
    writer.add_tags(["rayft", lineage.method])
    if lineage.license:
        writer.add_license(lineage.license)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, lineage.base_name)
    if lineage.base_repo_url:
        writer.add_base_model_repo_url(0, lineage.base_repo_url)
    for key, value in (
        ("rayft.version", __version__),
        ("rayft.training_method", lineage.method),
        ("rayft.base_model", lineage.base_name),
        ("rayft.base_model_revision", lineage.revision),
        ("rayft.adapter_hash", lineage.adapter_hash),
        ("rayft.data_hash", lineage.data_hash),
        ("rayft.config_hash", lineage.config_hash),
    ):
        if value:
            writer.add_string(key, value)


def write_gguf(model_dir: Path, out: Path, ftype: str, lineage: Lineage) -> dict[str, int]:
    """Write `model_dir` as a GGUF file of `ftype`; returns how many tensors got each type."""
    if ftype not in GGUF_TYPES:
        raise ExportError(
            f"export.gguf_types: unknown type {ftype!r} (known: {', '.join(GGUF_TYPES)})"
        )
    config = json.loads((model_dir / "config.json").read_text())
    _check_llama(config, model_dir / "config.json")
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    n_layers = config["num_hidden_layers"]
    rope = _rope(config)
    tied = bool(config.get("tie_word_embeddings"))

    writer = gguf.GGUFWriter(str(out), "llama", use_temp_file=True)  # tensors spill to disk
    _add_lineage(writer, lineage)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(GGUF_TYPES[ftype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    counts: dict[str, int] = {}
    if _rope_type(rope) == "llama3":
        writer.add_tensor(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)
        )
        counts["F32"] = 1
    for key, tensor in _tensors(model_dir):
        if tied and key == "lm_head.weight":
            continue  # readers tie output to token_embd when output.weight is absent
        base, _, suffix = key.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ExportError(f"{model_dir}: tensor '{key}' has no GGUF name for Llama")
        data = tensor.to(torch.float32).numpy()
        if key.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        qtype = tensor_type(key, data.shape, ftype)
        packed = gguf.quants.quantize(data, qtype)
        raw = (
            qtype
            if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else None
        )
        writer.add_tensor(f"{gguf_name}.{suffix}", packed, raw_dtype=raw)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
