"""The merged fallback: an adapter the engine cannot serve itself (DoRA on vLLM, or with
`serve.dora: merge`) is merged into the base and served as its own model under the adapter's
name, so `model: <adapter>` and experiment arms naming it work as for any adapter.

The merge is `rayft merge` itself (rayft.export.merge): the adapter's two vetted files are
copied into a scratch run directory `<run_dir>/serve/merged/<name>-<key>/adapter/`, and merge
writes `<that>/merged/` only once its logits match base + adapter. `key` changes with the
adapter's weights, so a merge that exists already is reused, and a changed adapter is merged
again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rayft.config import JobConfig
from rayft.errors import RayftError
from rayft.serving.adapters import CONFIG, WEIGHTS, fingerprint, read_config
from rayft.serving.errors import AdapterRefused


def kind(adapter: Path) -> str:
    """ "dora" or "lora": what an engine must be able to serve for this adapter."""
    return "dora" if read_config(adapter).get("use_dora") else "lora"


def merge_adapter(job: JobConfig, name: str, adapter: str | Path) -> str:
    """Merge a vetted adapter directory into `job`'s base; the verified model directory."""
    adapter = Path(adapter)
    work = job.run_path.resolve() / "serve" / "merged" / f"{name}-{fingerprint(name, adapter).key}"
    final = work / "merged"
    if (final / "config.json").exists():  # merge renames into place only after verifying
        return str(final)
    (work / "adapter").mkdir(parents=True, exist_ok=True)
    for file in (CONFIG, WEIGHTS):  # only the vetted files: no pickles, no tokenizer code
        shutil.copyfile(adapter / file, work / "adapter" / file)
    export = job.export
    if export.dtype == "auto":  # the dtype the engine computes in, not the training side's
        export = export.model_copy(
            update={"dtype": "bfloat16" if job.serve.gpus_per_replica else "float32"}
        )
    cfg = job.model_copy(
        update={
            "name": name,
            "run_dir": str(work),
            # Against the unquantized base even for a QLoRA-trained adapter: what an engine
            # serving the adapter itself computes, so both ways answer alike.
            "training": job.training.model_copy(update={"method": kind(adapter)}),
            "export": export,
        }
    )
    from rayft.export import merge

    try:
        return str(merge(cfg))
    except RayftError as e:  # ExportError, VerificationError: the adapter cannot be served
        raise AdapterRefused(f"{adapter}: merging it for serving failed: {e}", "path") from None
