"""The fine-tuning service: files and jobs in the database, each job a Ray job on the cluster
that serves (`ft_runner`: the CLI's prepare + train on a job file derived from the request).

A job moves `validating_files` (its rows checked by prepare's row rules, here) -> `queued`
(until `serve.fine_tuning.max_running_jobs` and the tenant's own limit allow it) -> `running`
(the Ray job; `ft_progress` turns what it writes into events and checkpoints) -> `succeeded`
(its adapter served as `ft:<base>:<tenant>:<suffix>:<job-id>`), `failed` or `cancelled`. The
database is the record: after a restart every job is still there and `tick` picks up where it
was, reconciling running jobs from Ray's job status.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from rayft.config import JobConfig
from rayft.serving import ft_progress
from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.ft_api import TERMINAL, JobCreate
from rayft.serving.ft_files import check_filename, check_rows, file_error, store_upload
from rayft.serving.ft_runner import job_file
from rayft.serving.ft_store import Store, default_url, new_id

log = logging.getLogger("ray.serve")
RUNNING = ("running",)
WAITING = ("validating_files", "queued")


class Service:
    def __init__(self, job: JobConfig, base_name: str):
        ft = job.serve.fine_tuning
        self.job, self.ft, self.base_name = job, ft, base_name
        self.state = Path(ft.state or job.run_path / "fine_tuning").resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        self.store = Store(ft.database or default_url(self.state))
        self._client = None

    # ------------------------------------------------------------------ files

    def add_file(self, tenant: str, filename: str | None, purpose: str, src: BinaryIO) -> dict:
        if purpose != "fine-tune":
            raise BadRequest(
                f"purpose {purpose!r} is not offered: this server takes `fine-tune` files",
                "purpose",
                "invalid_purpose",
            )
        name = check_filename(filename)
        file_id = new_id("files")
        path = self.state / "files" / f"{file_id}.jsonl"
        size, rows = store_upload(src, path, int(self.ft.max_file_mb * 1e6), self.ft.max_rows)
        return self.store.add(
            "files", id=file_id, tenant=tenant, filename=name, purpose=purpose, bytes=size,
            rows=rows, path=str(path),
        )  # fmt: skip

    def file(self, tenant: str | None, file_id: str) -> dict:
        row = self.store.get("files", file_id, tenant)
        if row is None:
            raise NotFound(f"No such file: {file_id}", "file_id", "file_not_found")
        return row

    def delete_file(self, tenant: str | None, file_id: str) -> None:
        row = self.file(tenant, file_id)
        users = [
            j["id"]
            for j in self.store.where("jobs", "status", [*WAITING, *RUNNING])
            if file_id in (j["training_file"], j["validation_file"])
        ]
        if users:
            raise BadRequest(
                f"file {file_id} is in use by job(s) {users}; delete it when they end",
                "file_id",
                "file_in_use",
            )
        self.store.delete("files", file_id)
        Path(row["path"]).unlink(missing_ok=True)

    # ------------------------------------------------------------------ jobs

    def create(self, tenant: str, req: JobCreate) -> dict:
        if req.model not in (self.base_name, "base", self.job.model.base):
            raise BadRequest(
                f"model {req.model!r} cannot be fine-tuned here: this server fine-tunes "
                f"{self.base_name!r} (continuing from a fine-tuned model is not offered)",
                "model",
                "model_not_available",
            )
        if self.ft.bases and self.base_name not in self.ft.bases:
            raise BadRequest(
                f"fine-tuning {self.base_name!r} is not enabled (serve.fine_tuning.bases)",
                "model",
                "model_not_available",
            )
        try:
            hyper = req.hyper()
        except ValueError as e:
            raise BadRequest(str(e), "hyperparameters", "invalid_value") from None
        self._bounds(hyper)
        files = {"training_file": req.training_file}
        if req.validation_file:
            files["validation_file"] = req.validation_file
        rows = {}
        for param, file_id in files.items():
            row = self.store.get("files", file_id, tenant)
            if row is None or row["purpose"] != "fine-tune":
                raise BadRequest(
                    f"{param}: no fine-tune file {file_id!r} (upload it with purpose fine-tune)",
                    param,
                    f"invalid_{param}",
                )
            rows[param] = row
        job_id = new_id("jobs")
        job_dir = self.state / "jobs" / job_id
        kind = req.kind()
        method = {"type": kind, kind: {"hyperparameters": hyper}}
        if kind == "reinforcement":
            method[kind]["grader"] = self._grader(req.method.reinforcement.grader)
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        self._write_job_dir(job_dir, job_id, rows, hyper, kind, seed, method[kind].get("grader"))
        self.store.add(
            "jobs", id=job_id, tenant=tenant, model=self.base_name,
            training_file=req.training_file, validation_file=req.validation_file,
            suffix=req.suffix, seed=seed, metadata=req.metadata, method=method,
            status="validating_files", result_files=[], run_dir=str(job_dir / "run"),
            metrics_read=0,
        )  # fmt: skip
        self.event(job_id, f"Validating training file: {req.training_file}")
        return self.get(tenant, job_id)

    def _grader(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A reinforcement job's grader, checked as training will build it, except that a
        python grader is refused: a request must never run code on the cluster."""
        from rayft.graders import GraderError, build

        where = "method.reinforcement.grader"
        try:
            build(spec, where=where, allow_python=False, base_url=self.job.training.grpo.base_url)
        except GraderError as e:
            raise BadRequest(str(e), where, "invalid_value") from None
        return spec

    def _bounds(self, hyper: dict[str, Any]) -> None:
        limits = {
            "n_epochs": self.ft.max_epochs,
            "batch_size": self.ft.max_batch_size,
            "learning_rate_multiplier": self.ft.max_learning_rate_multiplier,
        }
        for key, most in limits.items():
            if hyper[key] != "auto" and hyper[key] > most:
                raise BadRequest(
                    f"hyperparameters.{key}={hyper[key]} is above this server's limit of {most} "
                    f"(serve.fine_tuning.max_{key if key != 'n_epochs' else 'epochs'})",
                    f"hyperparameters.{key}",
                    "invalid_value",
                )

    def _write_job_dir(self, job_dir: Path, job_id: str, files: dict, hyper: dict,
                       kind: str, seed: int, grader: dict | None = None) -> None:  # fmt: skip
        data = job_file(
            self.job, job_id, job_dir / "run", files, hyper, kind, seed, _this_cluster(), grader
        )
        job_dir.mkdir(parents=True)
        (job_dir / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        request = {
            "files": {r["path"]: [param, r["id"]] for param, r in files.items()},
            "n_epochs": None if hyper["n_epochs"] == "auto" else hyper["n_epochs"],
        }
        (job_dir / "request.json").write_text(json.dumps(request))

    def get(self, tenant: str | None, job_id: str) -> dict:
        row = self.store.get("jobs", job_id, tenant)
        if row is None:
            raise NotFound(f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "not_found")
        return row

    def cancel(self, tenant: str | None, job_id: str) -> dict:
        row = self.get(tenant, job_id)
        if row["status"] in TERMINAL:
            raise BadRequest(
                f"job {job_id} has {row['status']} already; only a job that has not ended can be "
                "cancelled",
                "fine_tuning_job_id",
                "invalid_state",
            )
        # A waiting job is cancelled before the loop can claim it; one the loop claimed (or that
        # runs) has its Ray job stopped: what it wrote stays in its run dir.
        if not self.finish(row, "cancelled", WAITING):
            ft_progress.stop(self.client(), submission_id(job_id))
            if not self.finish(row, "cancelled", RUNNING):
                return self.cancel(tenant, job_id)  # it ended meanwhile: say how
        self.event(job_id, "Job cancelled by the user")
        return self.get(tenant, job_id)

    def event(self, job_id: str, message: str, level: str = "info", **data: Any) -> None:
        kind = "metrics" if data else "message"
        self.store.add(
            "events", job_id=job_id, level=level, message=message, type=kind, data=data or None
        )

    def finish(
        self, row: dict, status: str, from_status: tuple[str, ...] = (*WAITING, *RUNNING),
        **values: Any,
    ) -> bool:  # fmt: skip
        """End a job that is in one of `from_status`; False when it was not (anymore)."""
        return self.store.transition(
            row["id"], from_status, status=status, finished_at=int(time.time()),
            estimated_finish=None, **values,
        )  # fmt: skip

    # ------------------------------------------------------------------ the loop's steps

    def client(self):
        """The Ray Jobs client of the cluster this server runs on: its dashboard's address as
        the cluster itself records it (never a guess among the Rays on this machine)."""
        if self._client is None:
            from ray._private.services import get_webui_url_from_internal_kv
            from ray.job_submission import JobSubmissionClient

            dashboard = get_webui_url_from_internal_kv()
            if not dashboard:
                raise RuntimeError(
                    "the Ray cluster has no dashboard, which runs Ray Jobs: start it with its "
                    "dashboard (ray start --include-dashboard=true) to fine-tune on it"
                )
            if "://" not in dashboard:
                dashboard = f"http://{dashboard}"
            self._client = JobSubmissionClient(dashboard)
        return self._client

    def validate(self) -> None:
        """Check the files of jobs that wait in `validating_files`; queue or fail them."""
        for row in self.store.where("jobs", "status", ["validating_files"]):
            error = None
            for param in ("training_file", "validation_file"):
                if row[param] is None:
                    continue
                f = self.store.get("files", row[param])
                if f is None:
                    error = file_error(param, f"{row[param]} was deleted")
                else:
                    error = check_rows(Path(f["path"]), f["id"], param, row["method"]["type"])
                if error:
                    break
            if error:
                if self.finish(row, "failed", ("validating_files",), error=error):
                    self.event(row["id"], f"Job failed: {error['message']}", "error")
            elif self.store.transition(row["id"], ["validating_files"], status="queued"):
                self.event(row["id"], "Files validated, moving job to queued state")
            # else: cancelled meanwhile

    def start_queued(self) -> None:
        running = self.store.where("jobs", "status", ["running"])
        per_tenant: dict[str, int] = {}
        for r in running:
            per_tenant[r["tenant"]] = per_tenant.get(r["tenant"], 0) + 1
        for row in self.store.where("jobs", "status", ["queued"]):
            if len(running) >= self.ft.max_running_jobs:
                return
            if per_tenant.get(row["tenant"], 0) >= self.ft.max_running_per_tenant:
                continue
            sid = submission_id(row["id"])
            now = int(time.time())
            if not self.store.transition(
                row["id"], ["queued"], status="running", ray_job=sid, started_at=now
            ):
                continue  # cancelled meanwhile
            running.append(row)
            per_tenant[row["tenant"]] = per_tenant.get(row["tenant"], 0) + 1
            try:
                self.submit(row)
            except Exception as e:  # e.g. a runtime_env the cluster refuses: nothing runs
                error = {"code": "submission_failed", "param": None,
                         "message": f"Ray refused the job: {type(e).__name__}: {e}"[:1000]}  # fmt: skip
                if self.finish(row, "failed", RUNNING, error=error):
                    self.event(row["id"], f"Job failed: {error['message']}", "error")
                running.pop()  # its slot is free again
                per_tenant[row["tenant"]] -= 1
                continue
            if self.store.get("jobs", row["id"])["status"] != "running":  # a cancel won
                ft_progress.stop(self.client(), sid)
                continue
            self.event(row["id"], "Fine-tuning job started")

    def submit(self, row: dict) -> str:
        job_dir = Path(row["run_dir"]).parent
        c = self.job.cluster
        # The interpreter that runs this server runs the job, unless the job file names one.
        python = shlex.split(c.python) if c.python != "python" else [sys.executable]
        # Its env_vars never repeat the stages' own ray.init's (Ray refuses such a job).
        runtime_env = dict(c.runtime_env)
        return self.client().submit_job(
            entrypoint=shlex.join([*python, "-m", "rayft.serving.ft_runner", str(job_dir)]),
            submission_id=submission_id(row["id"]),
            runtime_env=runtime_env,
            metadata={
                "rayft": "1",
                "stage": "fine_tuning",
                "job": row["id"],
                "tenant": row["tenant"],
                "run_dir": row["run_dir"],
            },  # fmt: skip
        )


def _this_cluster() -> str | None:
    """The GCS address of the cluster this server runs on: the job's stages connect to it by
    name. Left to itself, a Ray job's driver may attach to whichever Ray on its machine it
    finds first (seen with two clusters on one node)."""
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def submission_id(job_id: str) -> str:
    """The Ray job of a fine-tuning job: one name, so that a cancel always finds it and Ray
    refuses to run it twice."""
    return f"rayft-{job_id}"


def tick(svc: Service) -> list[dict]:
    """One round of the loop: validate waiting files, follow running jobs, start queued ones.
    Returns the jobs whose training succeeded and whose model is to be served now. A job that
    fails to be followed is logged and tried again next round; it never stops the others."""
    svc.validate()
    done = []
    for row in svc.store.where("jobs", "status", ["running"]):
        try:
            if _follow(svc, row):
                done.append(svc.get(None, row["id"]))
        except Exception:
            log.exception("fine-tuning service: following job %s failed", row["id"])
    svc.start_queued()
    return done


def _follow(svc: Service, row: dict) -> bool:
    """Follow a running job one round; True when its training has succeeded."""
    state, message = ft_progress.ray_status(svc.client(), row["ray_job"])
    if state == "UNKNOWN":  # the dashboard did not answer: next round
        return False
    ft_progress.progress(svc, row)
    if state == "SUCCEEDED":
        return True
    if state in ("FAILED", "LOST"):
        ft_progress.stop(svc.client(), row["ray_job"])
        error = ft_progress.error_of(Path(row["run_dir"]).parent, message)
        if svc.finish(row, "failed", RUNNING, error=error):
            svc.event(row["id"], f"Job failed: {error['message']}", "error")
    elif state == "STOPPED" and svc.finish(row, "cancelled", RUNNING):  # `ray job stop`
        svc.event(row["id"], "Job cancelled: its Ray job was stopped")
    return False


def succeed(svc: Service, row: dict, served_as: str) -> bool:
    """Record a job whose model is served now: result file, tokens, status and events."""
    run_dir = Path(row["run_dir"])
    rows = ft_progress.read_rows(run_dir)
    result_id = new_id("files")
    path = svc.state / "files" / f"{result_id}.csv"
    path.write_text(ft_progress.results_csv(rows))
    svc.store.add(
        "files", id=result_id, tenant=row["tenant"], filename="step_metrics.csv",
        purpose="fine-tune-results", bytes=path.stat().st_size, rows=len(rows), path=str(path),
    )  # fmt: skip
    if not svc.finish(
        row, "succeeded", RUNNING, fine_tuned_model=served_as, result_files=[result_id],
        trained_tokens=ft_progress.trained_tokens(run_dir),
    ):  # fmt: skip
        return False  # cancelled meanwhile
    svc.event(row["id"], f"New fine-tuned model created: {served_as}")
    svc.event(row["id"], "The job has successfully completed")
    return True
