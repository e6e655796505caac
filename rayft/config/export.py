"""`export`: merged safetensors and GGUF files, and the prompts that verify them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayft.config.section import Section


class ExportConfig(Section):
    gguf_types: list[Literal["f32", "f16", "q8_0", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF tensor types to write, one verified file each: "
        "<run_dir>/export/<name>-<type>.gguf.",
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard of merged models.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the base is loaded, merged and saved in; auto: the training compute "
        "dtype (training.precision / quantization.compute_dtype; bf16 on GPU, fp32 on CPU).",
    )
    verify_prompts: list[str] = Field(
        default_factory=lambda: [
            "Hello! What can you do?",
            "Write one sentence about the sea.",
            "What is 17 times 3?",
        ],
        description="Fixed prompts used to verify merges and exports.",
    )
