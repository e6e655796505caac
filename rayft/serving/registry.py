"""What the server answers by name: the base, merged models, adapters and experiments.

The one home of the naming rules: a name means one thing (the base and its alias, a model with
an engine deployment, an adapter, an experiment), experiments' arms are models, never other
experiments, and every arm exists. The same rules check `serve:` in the job file when the app
is built and the admin API at run time. The state is persisted (`<run_dir>/serve/adapters.json`)
so a restarted ingress serves what was loaded before it. Plain Python: tested without Serve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.protocol import AdapterRef
from rayft.serving.routing import Target, resolve, unknown_model


@dataclass
class Registry:
    base_alias: str  # model.base as the job file writes it; `base` always works too
    models: set[str] = field(default_factory=set)  # configured model dirs (serve.models)
    adapters: dict[str, AdapterRef] = field(default_factory=dict)
    # adapter name -> {"adapter": dir, "model": merged dir, "app": None (configured, in the
    # main app) or the Serve application of an admin-loaded one}
    merged: dict[str, dict] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)  # name -> {"arms", "shadow"}
    path: Path | None = None  # where the state is persisted; None: not persisted
    base_name: str | None = None  # the base's served name (`serve.base_name`), beside the alias
    # adapter name -> the tenant whose fine-tuning job made it, experiment name -> the tenant
    # whose models are its arms: only that tenant sees and uses them. Names not listed are
    # everyone's.
    owners: dict[str, str] = field(default_factory=dict)
    store: object | None = None  # the fine-tuning service's database (ft_store.Store), if any
    server: str | None = None  # this `rayft serve`'s token: whose persisted state is whose

    # ------------------------------------------------------------------ names

    def engines(self) -> set[str]:
        """Names that have an engine deployment of their own: the base, models, merged adapters."""
        return {"base", *self.models, *self.merged}

    def holder(self, name: str) -> str | None:
        """What `name` means now ("the base model", "a model", ...), or None if it is free."""
        if name in self.base_names():
            return "the base model"
        if name in self.models:
            return "a model"
        if name in self.adapters or name in self.merged:
            return "an adapter"
        if name in self.experiments:
            return "an experiment"
        return None

    def check_free(self, name: str, what: str, replaces: str | None = None) -> None:
        """Refuse `name` for a new `what` unless it is free or holds a `replaces` (a reload)."""
        holder = self.holder(name)
        if holder is not None and holder != replaces:
            raise BadRequest(
                f"name {name!r} is taken by {holder}; pick another for the {what}", "name"
            )

    def base_names(self) -> tuple[str, ...]:
        return tuple(n for n in ("base", self.base_alias, self.base_name) if n)

    def route(
        self, model: str, user: str | None, tenant: str | None = None
    ) -> tuple[Target, Target | None]:
        """(the target that answers, the shadow target or None) for a request's `model`;
        a tenant's own fine-tuned models are unknown to every other tenant."""
        # The owner of what answers under any spelling (`<base>:<adapter>` too); an
        # experiment is its arms' tenant's (see add_experiment).
        target, shadow = self._resolve(model, user)
        owner = self.owners.get(target.experiment or target.arm)
        if owner is not None and owner != (tenant or "default"):  # an open API is `default`
            raise unknown_model(model)  # answered exactly as a name nobody serves
        return target, shadow

    def _resolve(self, model: str, user: str | None) -> tuple[Target, Target | None]:
        names = (self.base_names(), self.engines() - {"base"}, self.adapters, self.experiments)
        return resolve(model, *names, user)

    def visible(self, tenant: str | None) -> list[tuple[str, str]]:
        """(name, owner) of every name `tenant` may use (None: every name), for /v1/models:
        the base under its own name and as `base`, models, adapters, experiments."""
        names = [*(n for n in (self.base_name, "base") if n), *sorted(self.engines() - {"base"})]
        names += [*sorted(self.adapters), *sorted(self.experiments)]
        owned = [(n, self.owners.get(n)) for n in names]
        return [(n, o or "rayft") for n, o in owned if o is None or tenant in (None, o)]

    def arms_of(self, adapter: str) -> list[str]:
        """Experiments that route traffic (answers or shadow copies) to `adapter`."""
        return [
            e
            for e, x in self.experiments.items()
            if adapter in x["arms"] or x.get("shadow") == adapter
        ]

    # ------------------------------------------------------------------ changes

    def add_model(self, name: str) -> None:
        self.check_free(name, "model")
        self.models.add(name)

    def add_adapter(self, ref: AdapterRef) -> None:
        self.check_free(ref.name, "adapter", replaces="an adapter")
        self.merged.pop(ref.name, None)
        self.adapters[ref.name] = ref

    def add_merged(self, name: str, adapter: str, model: str, app: str | None) -> dict | None:
        """Serve adapter `name` as the merged model `model`; returns the entry it replaces."""
        self.check_free(name, "adapter", replaces="an adapter")
        self.adapters.pop(name, None)
        old = self.merged.get(name)
        self.merged[name] = {"adapter": adapter, "model": model, "app": app}
        return old

    def remove_adapter(self, name: str) -> dict | None:
        """Forget adapter `name`; returns its merged entry when it was served merged."""
        if name not in self.adapters and name not in self.merged:
            raise NotFound(f"No adapter named {name!r}", "name")
        users = self.arms_of(name)
        if users:
            raise BadRequest(
                f"adapter {name!r} is an arm of experiment(s) {users}; delete those first", "name"
            )
        self.adapters.pop(name, None)
        self.owners.pop(name, None)
        return self.merged.pop(name, None)

    def add_experiment(self, name: str, arms: dict[str, float], shadow: str | None) -> None:
        """Arm weights are checked by the request and config models (ExperimentConfig). Arms are
        kept under their own names (`base:a1` as `a1`), so the rule that an arm cannot be
        unloaded from under its experiment sees every spelling of it."""
        self.check_free(name, "experiment", replaces="an experiment")
        canonical: dict[str, float] = {}
        for arm, weight in arms.items():
            own = self._arm(arm, name)
            canonical[own] = canonical.get(own, 0) + weight
        own_shadow = self._arm(shadow, name) if shadow else None
        tenants = {self.owners[a] for a in [*canonical, own_shadow] if a in self.owners}
        if len(tenants) > 1:
            raise BadRequest(
                f"the arms of {name!r} are fine-tuned models of different tenants "
                f"({sorted(tenants)}); an experiment serves one tenant's models",
                "arms",
            )
        self.experiments[name] = {"arms": canonical, "shadow": own_shadow}
        self.owners.pop(name, None)
        if tenants:  # only that tenant sees and uses it, as its models
            self.owners[name] = tenants.pop()

    def _arm(self, arm: str, experiment: str) -> str:
        if arm in self.experiments or arm == experiment:
            raise BadRequest(f"arm {arm!r} is an experiment; arms are models", "arms")
        try:
            return self._resolve(arm, None)[0].arm  # the admin may name any tenant's model
        except NotFound:
            known = sorted({"base", *self.engines(), *self.adapters})
            raise NotFound(
                f"arm {arm!r} is neither `base`, a model nor an adapter (known: {known})",
                "arms",
                "model_not_found",
            ) from None

    def remove_experiment(self, name: str) -> None:
        if self.experiments.pop(name, None) is None:
            raise NotFound(f"No experiment named {name!r}", "name")
        self.owners.pop(name, None)

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        data = {
            "adapters": {n: vars(a) for n, a in self.adapters.items()},
            "experiments": self.experiments,
            "merged": self.merged,
            "owners": self.owners,
            "server": self.server,
        }
        if self.store is not None:
            self.store.save_registry(data)  # type: ignore[attr-defined]
            return
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)

    def restore(self, vet=None) -> bool:
        """Take the persisted state; False when nothing was persisted.

        The state this server saved (an ingress replica that restarted) is taken whole, unloads
        of configured names included. State an earlier server left in the database (the
        fine-tuning service's) is added to what the job file configures now: names the job
        file does not use, adapters that `vet(path)` still accepts (they must fit today's
        base), experiments whose arms all exist."""
        if self.store is not None:
            saved = self.store.load_registry()  # type: ignore[attr-defined]
            if saved is None:
                return False
        elif self.path is None or not self.path.exists():
            return False
        else:
            saved = json.loads(self.path.read_text())
        if self.store is not None and saved.get("server") != self.server:
            self._merge(saved, vet or (lambda path: True))
            return True
        self.owners = saved.get("owners", {})
        self.adapters = {n: AdapterRef(**a) for n, a in saved["adapters"].items()}
        self.experiments = saved["experiments"]
        self.merged = saved.get("merged", {})
        return True

    def _merge(self, saved: dict, vet) -> None:
        taken = {*self.base_names(), *self.models, *self.adapters, *self.merged, *self.experiments}
        owners = saved.get("owners", {})
        for name, a in saved["adapters"].items():
            if name not in taken and vet(a["path"]):
                self.adapters[name] = AdapterRef(**a)
        for name, m in saved.get("merged", {}).items():
            if name not in taken and m["app"] is not None:  # admin-loaded; dropped if not running
                self.merged[name] = m
        for name, x in saved["experiments"].items():
            arms = [*x["arms"], *([x["shadow"]] if x.get("shadow") else [])]
            if name not in taken and all(self.holder(a) is not None for a in arms):
                self.experiments[name] = x
        kept = {*self.adapters, *self.merged, *self.experiments}
        self.owners = {n: o for n, o in owners.items() if n in kept}
