"""The fine-tuning service inside the ingress: its loop (`ft_jobs.tick` every
`serve.fine_tuning.poll_s`) and what serving a finished job means: its adapter and checkpoints
checked against the engine's base (shapes, rank, the chat template and end of turn it was
trained with) and added to the registry as the tenant's own `ft:` names, under the admin lock.
Every engine replica serves them (adapters load per request by path), and the registry's
state is in the service's database, so a restarted server serves them again."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rayft.adapters import AdapterError, check_compatible, fingerprint, kind, resolve_adapter
from rayft.manifest import read_manifest
from rayft.serving import ft_jobs, ft_progress
from rayft.training.facts import end_of_turn_ids, template_hash

log = logging.getLogger("ray.serve")


async def run(st) -> None:
    svc = st.ft
    while True:
        try:
            done = await asyncio.to_thread(ft_jobs.tick, svc)
            for row in done:
                async with st.admin_lock:
                    await asyncio.to_thread(serve_job, st, row)
        except Exception:  # the loop outlives a bad round: the next one retries
            log.exception("fine-tuning service: a round of the job loop failed")
        await asyncio.sleep(svc.ft.poll_s)


def serve_job(st, row: dict) -> None:
    svc = st.ft
    name = ft_progress.model_name(row)
    run_dir = Path(row["run_dir"])
    try:
        path = resolve_adapter(str(run_dir / "adapter"), None, run_dir / "cache")
        check_compatible(path, st.linears, st.s.job.serve.max_lora_rank)
        if kind(path) not in st.s.adapter_kinds:
            raise AdapterError(
                f"the engine does not serve {kind(path)} adapters; fine-tune with training."
                "method lora or qlora on this server"
            )
        check_template(run_dir, st.tokenizers["base"], required=True)
    except Exception as e:  # any reason not to serve it fails the job, with that reason
        why = e.message if isinstance(e, AdapterError) else f"{type(e).__name__}: {e}"[:1000]
        error = {"code": "model_refused", "param": None, "message": why}
        if svc.finish(row, "failed", ft_jobs.RUNNING, error=error):
            svc.event(row["id"], f"Job failed: {why}", "error")
        return
    names = [(name, path)] + [
        (c["name"], Path(c["path"]))
        for c in svc.store.where("checkpoints", "job_id", [row["id"]])
        if Path(c["path"]).is_dir()
    ]
    for served, where in names:  # served first: a client that sees `succeeded` may call it
        st.registry.add_adapter(fingerprint(served, where))
        st.registry.owners[served] = row["tenant"]
    if not ft_jobs.succeed(svc, row, name):  # cancelled meanwhile: not served after all
        for served, _ in names:
            st.registry.remove_adapter(served)
    st.registry.save()


def check_template(run_dir: Path, tokenizer, required: bool = False) -> None:
    """The base's chat template and end of turn are the ones the adapter was trained with
    (run.json's train facts): served with another template it would answer out of format.
    A run that recorded none (an older rayft) passes unless `required`."""
    facts = read_manifest(run_dir).get("stages", {}).get("train", {}).get("facts")
    if not facts:
        if required:
            raise AdapterError(f"{run_dir}: run.json has no train facts; the run did not finish")
        return
    trained = facts["tokenizer"]
    template = tokenizer.chat_template
    served = template_hash(template if isinstance(template, str) else None)
    if trained.get("chat_template_sha256") != served:
        raise AdapterError(
            f"the adapter was trained with chat template {trained.get('chat_template_sha256')}"
            f", and the served base renders prompts with {served}: served here it would answer "
            "out of the format it learned. Serve the base the job file names"
        )
    if set(trained.get("end_of_turn_ids") or []) - set(end_of_turn_ids(tokenizer)):
        raise AdapterError(
            f"the adapter ends its answers with token ids {trained['end_of_turn_ids']}, which "
            "the served base does not stop at"
        )
