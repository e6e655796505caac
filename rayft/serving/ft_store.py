"""The fine-tuning service's state: files, jobs, events, checkpoints and what the admin API
loaded, in one SQL database (SQLite in the state directory by default, any SQLAlchemy URL, e.g.
Postgres, where several servers share it).

SQLAlchemy Core, synchronous: the routes call it through `asyncio.to_thread`. Every row carries
its tenant; a lookup with a tenant finds only that tenant's rows (another tenant's id is "not
found", never "forbidden"); `tenant=None` is the admin key, which sees all. Lists are OpenAI's:
newest first, `after` an id, `limit` rows, `has_more`.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

meta = sa.MetaData()


def _table(name: str, *columns: sa.Column) -> sa.Table:
    # `seq` orders rows as they were created (ids are random): lists and `after` use it.
    return sa.Table(
        name,
        meta,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), unique=True, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        *columns,
    )


files = _table(
    "files",
    sa.Column("tenant", sa.String(128), index=True, nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(64), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
)
jobs = _table(
    "jobs",
    sa.Column("tenant", sa.String(128), index=True, nullable=False),
    sa.Column("model", sa.String(512), nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON),
    sa.Column("method", sa.JSON, nullable=False),  # {"type": ..., <type>: {"hyperparameters"}}
    sa.Column("status", sa.String(32), index=True, nullable=False),
    sa.Column("error", sa.JSON),
    sa.Column("started_at", sa.Integer),
    sa.Column("finished_at", sa.Integer),
    sa.Column("estimated_finish", sa.Integer),
    sa.Column("fine_tuned_model", sa.String(512)),
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("result_files", sa.JSON, nullable=False),
    sa.Column("ray_job", sa.String(128)),  # the Ray job's submission id
    sa.Column("run_dir", sa.Text, nullable=False),
    sa.Column("metrics_read", sa.Integer, nullable=False, default=0),  # metrics.jsonl lines seen
)
events = _table(
    "events",
    sa.Column("job_id", sa.String(64), index=True, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),  # "message" or "metrics"
    sa.Column("data", sa.JSON),
)
checkpoints = _table(
    "checkpoints",
    sa.Column("job_id", sa.String(64), index=True, nullable=False),
    sa.Column("step_number", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("name", sa.String(512), nullable=False),  # fine_tuned_model_checkpoint
    sa.Column("path", sa.Text, nullable=False),
)
# What the admin API loaded (adapters, experiments): the registry's persisted state, one row.
registry = _table("registry", sa.Column("state", sa.JSON, nullable=False))

TABLES = {"files": files, "jobs": jobs, "events": events, "checkpoints": checkpoints}
PREFIX = {"files": "file-", "jobs": "ftjob-", "events": "ftevent-", "checkpoints": "ftckpt-"}
OWNED = ("files", "jobs")  # rows with a tenant column; events and checkpoints belong to a job


def new_id(kind: str) -> str:
    return PREFIX[kind] + secrets.token_hex(12)


def default_url(state_dir: str | Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'service.db'}"


class Store:
    def __init__(self, url: str):
        sqlite = url.startswith("sqlite")
        self.engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
            pool_pre_ping=not sqlite,
        )
        if sqlite:  # readers do not block the one writer (the ingress and the job poller)

            @sa.event.listens_for(self.engine, "connect")
            def _wal(conn, _):
                conn.execute("PRAGMA journal_mode=WAL")

        meta.create_all(self.engine)

    # ------------------------------------------------------------------ rows

    def add(self, kind: str, **values: Any) -> dict[str, Any]:
        values.setdefault("id", new_id(kind))
        values.setdefault("created_at", int(time.time()))
        with self.engine.begin() as c:
            c.execute(TABLES[kind].insert().values(**values))
        return self.get(kind, values["id"])  # type: ignore[return-value]

    def get(self, kind: str, id: str, tenant: str | None = None) -> dict[str, Any] | None:
        t = TABLES[kind]
        q = sa.select(t).where(t.c.id == id)
        if tenant is not None and kind in OWNED:
            q = q.where(t.c.tenant == tenant)
        with self.engine.connect() as c:
            row = c.execute(q).mappings().first()
        return dict(row) if row else None

    def update(self, kind: str, id: str, **values: Any) -> None:
        t = TABLES[kind]
        with self.engine.begin() as c:
            c.execute(t.update().where(t.c.id == id).values(**values))

    def transition(self, id: str, from_status: tuple[str, ...] | list[str], **values: Any) -> bool:
        """Update job `id` only while its status is one of `from_status`; whether it was. The
        loop and the routes race (a cancel while the loop starts or finishes the job): each
        move is a compare-and-set, so the first one wins and the other sees it lost."""
        with self.engine.begin() as c:
            done = c.execute(
                jobs.update()
                .where(jobs.c.id == id, jobs.c.status.in_(list(from_status)))
                .values(**values)
            )
        return done.rowcount == 1

    def delete(self, kind: str, id: str) -> None:
        t = TABLES[kind]
        with self.engine.begin() as c:
            c.execute(t.delete().where(t.c.id == id))

    def page(
        self,
        kind: str,
        *,
        tenant: str | None = None,
        after: str | None = None,
        limit: int = 20,
        newest_first: bool = True,
        **equal: Any,
    ) -> tuple[list[dict[str, Any]], bool]:
        """(rows, has_more): rows matching `equal`, after the row `after`, in list order."""
        t = TABLES[kind]
        q = sa.select(t)
        if tenant is not None and kind in OWNED:
            q = q.where(t.c.tenant == tenant)
        for column, value in equal.items():
            q = q.where(t.c[column] == value)
        if after is not None:  # a cursor outside the tenant's rows is no cursor (no oracle)
            mark = sa.select(t.c.seq).where(t.c.id == after)
            if tenant is not None and kind in OWNED:
                mark = mark.where(t.c.tenant == tenant)
            for column, value in equal.items():
                mark = mark.where(t.c[column] == value)
            mark = mark.scalar_subquery()
            q = q.where(t.c.seq < mark if newest_first else t.c.seq > mark)
        q = q.order_by(t.c.seq.desc() if newest_first else t.c.seq).limit(limit + 1)
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(q).mappings()]
        return rows[:limit], len(rows) > limit

    def where(self, kind: str, column: str, values: list[Any]) -> list[dict[str, Any]]:
        """Every row whose `column` is one of `values`, oldest first (the scheduler's view)."""
        t = TABLES[kind]
        q = sa.select(t).where(t.c[column].in_(values)).order_by(t.c.seq)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # ------------------------------------------------------------------ the registry's state

    def save_registry(self, state: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(registry.delete())
            c.execute(
                registry.insert().values(id="registry", created_at=int(time.time()), state=state)
            )

    def load_registry(self) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(registry.c.state)).first()
        return row[0] if row else None
