"""The python grader: the job file's own `def grade(sample, item) -> float`.

It runs in a fresh interpreter (sys.executable, not a fork of the trainer: a fork would copy
CUDA state and the trainer's memory), one process per batch rather than per sample (start-up
is ~50 ms, a GRPO step grades hundreds of samples). That process is NOT a sandbox: it has the
user's rights, files and network; the timeout only bounds how long a batch can take.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rayft.graders import spec
from rayft.graders.spec import GraderError

Batch = tuple[list[float], list[str | None]]
CHILD = str(Path(__file__).with_name("python_child.py"))


@dataclass(frozen=True)
class Python:
    source: str
    timeout_s: float

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        scores = [0.0] * len(samples)
        errors: list[str | None] = [None] * len(samples)
        pairs, where = [], []
        for k, pair in enumerate(zip(samples, items, strict=True)):
            try:
                pairs.append(json.dumps(pair))
                where.append(k)
            except (TypeError, ValueError) as e:
                errors[k] = f"python grader: the sample or its item is not JSON: {e}"
        if not pairs:
            return scores, errors
        payload = f'{{"source": {json.dumps(self.source)}, "pairs": [{", ".join(pairs)}]}}'
        results = self._run(payload, len(pairs))
        for k, r in zip(where, results, strict=True):
            if isinstance(r, str):
                errors[k] = r
            elif "error" in r:
                errors[k] = f"python grader: {r['error']}"
            else:
                scores[k] = float(r["score"])
        return scores, errors

    def _run(self, payload: str, n: int) -> list[dict | str]:
        """One result per pair, or the same whole-batch error string n times."""
        # -P: the child's folder (this package) is not put on sys.path, so its modules cannot
        # shadow what the grader imports. A new session, so a timeout kills what it started too.
        proc = subprocess.Popen(
            [sys.executable, "-P", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(payload, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return [
                f"python grader: timed out after {self.timeout_s:g} s grading a batch of {n} "
                "(the whole batch fails; raise timeout_s or make grade faster)"
            ] * n
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "fatal" in answer:
            return [f"python grader: the source failed to run: {answer['fatal']}"] * n
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != n:
            last = (err.strip().splitlines() or ["no output"])[-1][:300]
            return [
                f"python grader: the grading process exited with code {proc.returncode} "
                f"without an answer: {last}"
            ] * n
        return results


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # Reap it and close the pipes; a process that left the group may still hold them open.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


def build_python(s: dict, where: str, allow_python: bool) -> Python:
    if not allow_python:
        raise GraderError(
            f"{where}: python graders run only from a local job file (`rayft train`, `rayft "
            "eval`), never from a request to the server: their code runs with the rights of "
            "the process that grades"
        )
    source = spec.text(s, "source", where)
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise GraderError(f"{where}.source: line {e.lineno}: {e.msg}") from None
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} | {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    if "grade" not in defined:
        raise GraderError(f"{where}.source: defines no top-level `def grade(sample, item)`")
    return Python(source, spec.positive(s, "timeout_s", where, 10.0))
