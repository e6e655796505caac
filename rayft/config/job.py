"""The job file: one YAML document of all sections; loading, `--set` overrides, the digest and
the field help that `rayft config show` prints."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from rayft.config.cluster import ClusterConfig
from rayft.config.data import DataConfig
from rayft.config.evaluation import EvalConfig
from rayft.config.export import ExportConfig
from rayft.config.model import ModelConfig
from rayft.config.section import Section
from rayft.config.serving import ServeConfig
from rayft.config.training import TrainingConfig
from rayft.errors import RayftError


class ConfigError(RayftError):
    """A job file that cannot be used; the message says where and what to do."""


class JobConfig(Section):
    name: str = Field("run", description="Run name (used in manifests and job names).")
    run_dir: str = Field("runs/run", description="Directory every stage reads from and writes to.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data preparation.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where it runs.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Merge and export.")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def digest(self) -> str:
        """Stable hash of the resolved config (goes into every manifest)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Known field names of the section that `loc` (a pydantic error location) points into."""
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = next((a for a in _model_types(ann)), None)
    return list(model.model_fields) if model else []


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _model_types(arg)]


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            close = difflib.get_close_matches(key, _fields_at(e["loc"]), n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            lines.append(f"  {where}: unknown key{hint}")
        else:
            lines.append(f"  {where}: {e['msg']}")
    lines.append("See `rayft config show --help-fields` for every key and its meaning.")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.max_steps=20")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> JobConfig:
    """Read a job file (or start from defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read job file ({e.strerror})") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: a job file is a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def field_help(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_types(field.annotation)
        if sub and field.default_factory is not None:
            rows.append((key, "", field.description or ""))
            rows.extend(field_help(sub[0], key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, json.dumps(default, default=str), field.description or ""))
    return rows
