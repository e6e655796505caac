"""`rayft jobs fetch ID`: the small artifacts of a submitted run, copied to this machine.

A submitted stage writes its run dir on the cluster's shared storage. A tiny job there reads the
small files (adapter, reports, summaries, run.json, metrics; not the data splits, checkpoints or
merged weights) and prints them base64-encoded into its log, which this side reads through the
dashboard: the one address `rayft submit` has, and the one a laptop usually reaches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from rayft.cluster.jobs import _refusals, client, dashboard_address, tiny_job
from rayft.errors import RayftError

LINE = "RAYFT_FILE "
CHUNK = 3 * 2**18  # bytes per log line (1 MiB of base64)
BIG = 256 * 2**20  # larger files are weights (merged/, model/, export/), not artifacts
LIMIT = 1024 * 2**20  # the most one fetch carries through a job log
SKIP = ("checkpoints", "serve", "eval/adapter_cache")


def small_files(run_dir: Path) -> Iterator[Path]:
    """The run's artifacts worth copying: everything but data splits, checkpoints, caches and
    weights outside adapter/."""
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if not path.is_file() or path.is_symlink() or any(rel.startswith(d + "/") for d in SKIP):
            continue
        if rel.startswith("data/") and rel.count("/") > 1:  # data/train/part-000.parquet
            continue
        if rel.startswith("adapter/") or path.stat().st_size <= BIG:
            yield path


def main(argv: list[str]) -> int:
    """The fetch job: print every small file of the run dir as log lines."""
    run_dir = Path(json.loads(argv[0])["run_dir"])
    if not (run_dir / "run.json").is_file():
        print(f"{run_dir} holds no run.json on this node", file=sys.stderr)
        return 1
    total = 0
    for path in small_files(run_dir):
        rel, digest = path.relative_to(run_dir).as_posix(), hashlib.sha256()
        total += path.stat().st_size
        if total > LIMIT:
            print(
                f"more than {LIMIT >> 20} MiB of artifacts: copy {run_dir} directly",
                file=sys.stderr,
            )
            return 1
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                print(f"{LINE}{json.dumps(rel)} {base64.b64encode(chunk).decode()}")
        print(f"{LINE}{json.dumps(rel)} sha256={digest.hexdigest()}", flush=True)
    return 0


def _write(logs: str, out: Path) -> list[str]:
    """Rebuild the files of a fetch job's log under `out`, each checked against its digest."""
    parts: dict[str, list[bytes]] = {}
    done = []
    for line in logs.splitlines():
        if not line.startswith(LINE):
            continue
        name, _, data = line.removeprefix(LINE).rpartition(" ")
        rel = json.loads(name)
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RayftError(f"jobs fetch: refusing the path {rel!r} from the cluster")
        if not data.startswith("sha256="):
            parts.setdefault(rel, []).append(base64.b64decode(data))
            continue
        blob = b"".join(parts.pop(rel, []))
        if hashlib.sha256(blob).hexdigest() != data.removeprefix("sha256="):
            raise RayftError(f"jobs fetch: {rel} arrived damaged; fetch again")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(blob)
        done.append(rel)
    return done


def fetch(job_id: str, address: str | None = None, out: str | Path | None = None) -> int:
    """Copy the small artifacts of job `job_id`'s run dir to `out` (default: ./<run dir name>),
    read on the cluster (even where this machine sees the run dir too: one way, always tried)."""
    jsc = client(address)
    with _refusals(dashboard_address(address)):
        info = jsc.get_job_info(job_id)
        meta = info.metadata or {}
        if not meta.get("run_dir"):
            raise RayftError(f"job {job_id} records no run_dir: not submitted by `rayft submit`")
        run_dir = Path(meta["run_dir"])
        env = {k: v for k, v in (info.runtime_env or {}).items() if k in ("pip", "uv", "env_vars")}
        ask = {"run_dir": str(run_dir)}
        logs = tiny_job(jsc, meta.get("python", "python"), env, "rayft.cluster.fetch", ask, 600)
    target = Path(out or run_dir.name)
    files = _write(logs, target)
    print(f"fetched {len(files)} files of {run_dir} (job {job_id}) to {target}:")
    for rel in files:
        print(f"  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
