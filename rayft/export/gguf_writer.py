"""Write a Llama-family safetensors model directory as one GGUF file (the `gguf` package).

Follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM`: the same tensor names, the same
metadata keys, 1-D tensors kept in f32, and q/k projections permuted from HF's rotary layout
(rotate-half: first half of each head's dims, then second half) to GGML's interleaved pairs.
Readers (llama.cpp, transformers' GGUF loader) undo that permutation, so a file without it loads
silently wrong; the round-trip verification catches exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from rayft.export.errors import ExportError

GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


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
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"{where}: rope type {rope.get('rope_type')!r}; GGUF export supports default rope only "
            "(scaled rope needs llama.cpp's rope_freqs tensor, which this writer does not emit)"
        )


def _tensor_type(name: str, shape: tuple[int, ...], ftype: str) -> gguf.GGMLQuantizationType:
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


def _tensors(model_dir: Path):
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors weights")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
    ):
        raise ExportError(
            f"{model_dir / 'tokenizer.json'}: GGUF export supports byte-level BPE tokenizers with "
            f"GPT-2 pre-tokenization; this one is {model.get('type')} / {pre.get('type')}"
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
    writer.add_tokenizer_pre("gpt-2")
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


def write_gguf(model_dir: Path, out: Path, ftype: str, name: str) -> dict[str, int]:
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
    rope = config.get("rope_parameters") or {}
    tied = bool(config.get("tie_word_embeddings"))

    writer = gguf.GGUFWriter(str(out), "llama", use_temp_file=True)  # tensors spill to disk
    writer.add_name(name)
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
        qtype = _tensor_type(key, data.shape, ftype)
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
