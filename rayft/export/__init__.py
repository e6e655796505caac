"""Deployable weights from an adapter: `merge` (LoRA/DoRA/QLoRA -> safetensors) and `export`
(GGUF), each verified against its reference before anything is written in place."""

from rayft.export.errors import ExportError, VerificationError
from rayft.export.gguf_export import export
from rayft.export.merge import merge

__all__ = ["ExportError", "VerificationError", "export", "merge"]
