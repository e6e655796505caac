"""The merged fallback: an adapter the engine cannot serve itself (DoRA on vLLM, or with
`serve.dora: merge`) is merged into the base and served as its own model under the adapter's
name, so `model: <adapter>` and experiment arms naming it work as for any adapter.

The merge is `rayft merge` itself (rayft.export.merge): the adapter's two vetted files are
copied into a scratch run directory `<run_dir>/serve/merged/<name>-<key>/adapter/`, and merge
writes `<that>/merged/` only once its logits match base + adapter. `key` changes with the
adapter's weights, the base model (its directory or hub id, revision and weight files) and the
merge dtype, so a merge that exists already is reused, and anything else is merged again.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from rayft.adapters import CONFIG, WEIGHTS, fingerprint, kind
from rayft.config import DeepSpeedConfig, JobConfig
from rayft.dtypes import default_dtype
from rayft.errors import RayftError
from rayft.serving.errors import AdapterRefused


def _dtype(job: JobConfig) -> str:
    if job.export.dtype == "auto":  # the dtype the engine computes in, not the training side's
        return default_dtype(job.serve.gpus_per_replica > 0)
    return job.export.dtype


def _base_identity(job: JobConfig) -> str:
    """What the merge was made from: the base's directory (or hub id) and revision, and for a
    local directory the size and time of its files, so a base replaced in place counts too."""
    from rayft import models

    base = models.resolve(job.model.base, job.model.revision, pull_missing=False)
    parts = [base, str(job.model.revision)]
    if Path(base).is_dir():
        for f in sorted(Path(base).iterdir()):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def merge_dir(job: JobConfig, name: str, adapter: Path) -> Path:
    """The scratch run directory of this adapter's merge into this base, in this dtype."""
    blob = f"{fingerprint(name, adapter).key}|{_base_identity(job)}|{_dtype(job)}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return job.run_path.resolve() / "serve" / "merged" / f"{name}-{key}"


def merge_adapter(job: JobConfig, name: str, adapter: str | Path) -> str:
    """Merge a vetted adapter directory into `job`'s base; the verified model directory."""
    adapter = Path(adapter)
    work = merge_dir(job, name, adapter)
    final = work / "merged"
    if (final / "config.json").exists():  # merge renames into place only after verifying
        return str(final)
    (work / "adapter").mkdir(parents=True, exist_ok=True)
    for file in (CONFIG, WEIGHTS):  # only the vetted files: no pickles, no tokenizer code
        shutil.copyfile(adapter / file, work / "adapter" / file)
    export = job.export.model_copy(update={"dtype": _dtype(job)})
    cfg = job.model_copy(
        update={
            "name": name,
            "run_dir": str(work),
            # Against the unquantized base even for a QLoRA-trained adapter: what an engine
            # serving the adapter itself computes, so both ways answer alike. No DeepSpeed: an
            # unquantized merge does not depend on it, and a raw config file need not be here.
            "training": job.training.model_copy(
                update={"method": kind(adapter), "deepspeed": DeepSpeedConfig()}
            ),
            "export": export,
        }
    )
    from rayft.export import merge

    try:
        return str(merge(cfg))
    except RayftError as e:  # ExportError, VerificationError: the adapter cannot be served
        raise AdapterRefused(f"{adapter}: merging it for serving failed: {e}", "path") from None
