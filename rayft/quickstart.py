"""`rayft quickstart`: the whole loop (pull, prepare, train, eval) on the embedded default.

Each stage is skipped on `--resume` when the run dir shows it finished (its artifact exists and
run.json records the stage; stages record themselves last, so an interrupted stage is redone).
Training itself continues from its last checkpoint via `train(cfg, resume=True)`.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rayft import manifest, models
from rayft.cluster.connect import local_cpus, ray_session
from rayft.config import JobConfig, load_config
from rayft.errors import RayftError
from rayft.evaluation import EvalArtifacts, evaluate

DEFAULT_CONFIG = Path("configs") / "quickstart.yaml"


class QuickstartError(RayftError):
    """The quickstart cannot start; the message says why and what to do."""


def default_config() -> Path:
    """configs/quickstart.yaml of the working directory, else of the source checkout."""
    for path in (DEFAULT_CONFIG, Path(__file__).resolve().parents[1] / DEFAULT_CONFIG):
        if path.exists():
            return path
    raise QuickstartError(
        f"{DEFAULT_CONFIG}: not found; run from the rayft checkout or pass a job file: "
        "`rayft quickstart CONFIG`"
    )


def finished(cfg: JobConfig) -> dict[str, bool]:
    """Which stages the run dir shows as complete."""
    run_dir = cfg.run_path
    recorded = manifest.read_manifest(run_dir).get("stages", {})
    out_dir = run_dir / ("model" if cfg.training.method == "full" else "adapter")
    artifacts = {
        "prepare": run_dir / "data" / "data_report.json",
        "train": out_dir
        / ("config.json" if cfg.training.method == "full" else "adapter_config.json"),
        "eval": run_dir / "eval" / "report.html",
    }
    return {stage: stage in recorded and path.exists() for stage, path in artifacts.items()}


def _resume_command(config: str | None, overrides: Sequence[str]) -> str:
    parts = ["rayft", "quickstart", *([config] if config else [])]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join([*parts, "--resume"])


def quickstart(
    config: str | None = None, overrides: Sequence[str] = (), resume: bool = False
) -> EvalArtifacts:
    """Pull the base model, prepare the demo data, train a LoRA adapter, evaluate it vs base."""
    from rayft.data import prepare
    from rayft.training import train

    console = Console()
    cfg = load_config(config or default_config(), list(overrides))
    done = finished(cfg) if resume else {}
    if not resume and any(finished(cfg).values()):
        raise QuickstartError(
            f"{cfg.run_dir} already holds a quickstart run: continue it with "
            f"`{_resume_command(config, overrides)}`, or delete {cfg.run_dir} to start over"
        )
    console.rule(f"rayft quickstart: {cfg.model.base} -> {cfg.run_dir}")
    if cfg.model.base in models.REGISTRY and not models.is_cached(cfg.model.base):
        console.print(
            f"pulling {cfg.model.base} (once; cached in {models.cache_dir(cfg.model.base)})"
        )
        models.pull(cfg.model.base)

    stages: list[tuple[str, Callable[[], object]]] = [
        ("prepare", lambda: prepare(cfg)),
        ("train", lambda: train(cfg, resume=resume)),
        ("eval", lambda: evaluate(cfg)),
    ]
    timings: dict[str, str] = {}
    c = cfg.cluster
    num_cpus = local_cpus(c.num_workers, c.cpus_per_worker)
    try:
        with ray_session(c.address, num_cpus=num_cpus):
            for name, run in stages:
                if done.get(name):
                    timings[name] = "skipped (already complete)"
                    console.print(f"[dim]{name}: already complete, skipped[/dim]")
                    continue
                console.rule(name)
                start = time.perf_counter()
                run()
                timings[name] = f"{time.perf_counter() - start:.0f} s"
    except (KeyboardInterrupt, SystemExit):
        # Ray Train answers Ctrl-C by aborting the run and raising SystemExit(0) from its own
        # signal handler; either way the stage did not finish, so say how to continue.
        console.print(
            f"\n[yellow]interrupted[/yellow]: the run in {cfg.run_dir} is kept; continue it with "
            f"`{_resume_command(config, overrides)}`"
        )
        raise KeyboardInterrupt from None
    return _summary(cfg, timings, console)


def _summary(cfg: JobConfig, timings: dict[str, str], console: Console) -> EvalArtifacts:
    """Stage times and the headline comparison, read back from the report on disk."""
    out = cfg.run_path / "eval"
    report = json.loads((out / "report.json").read_text())
    table = Table(title="quickstart")
    table.add_column("stage")
    table.add_column("time", justify="right")
    for name, took in timings.items():
        table.add_row(name, took)
    console.print(table)
    for cand, metrics in report["comparisons"].items():
        # The task metric: the first configured check, else exact match.
        key = next((m for m in metrics if m.startswith("check:")), "exact_match")
        c = metrics[key]
        verdict = (
            "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "no clear change"
        )
        console.print(
            f"{cand} vs base on {key}: {c['base']:.2f} -> {c['candidate']:.2f} "
            f"(delta {c['delta']:+.2f}, 95% CI [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}], "
            f"p={c['p_value']:.2g}): {verdict}"
        )
    html = (out / "report.html").resolve()
    console.print(f"report: {html}")
    return EvalArtifacts(out / "report.json", out / "report.md", html, report)
