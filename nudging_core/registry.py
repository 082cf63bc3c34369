"""The served models: their config, their upstream replicas and the nudger's chat template."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nudging_core.templates import AUTO_TEMPLATE, ChatTemplate, get_chat_template
from nudging_core.types import Role
from nudging_core.upstream import NoChatTemplate, ReplicaSet, UpstreamClient, UpstreamError

from .admission import Admission
from .config import Config, ModelConfig, UpstreamConfig


@dataclass(frozen=True, slots=True)
class ServedModel:
    config: ModelConfig
    replicas: dict[Role, ReplicaSet]
    chat_template: ChatTemplate | None
    admission: Admission

    def pick_clients(self) -> dict[Role, UpstreamClient]:
        """One replica per role for one generation, which stays on them (prefix cache)."""
        return {role: replicas.pick() for role, replicas in self.replicas.items()}

    @property
    def uses_upstream_template(self) -> bool:
        nudging = self.config.nudging
        return nudging is not None and nudging.chat_template == AUTO_TEMPLATE


class ModelRegistry:
    """Builds the replicas of each distinct upstream once and shares them between model names."""

    def __init__(self, config: Config) -> None:
        self._replicas: dict[tuple[tuple[str, ...], str, str | None, str, str], ReplicaSet] = {}
        # Upstreams seen to render their chat template (a server's template does not change).
        self._renders: set[tuple[str, str]] = set()
        # Moves with every report_down: a readiness answer from before it is out of date.
        self.down_reports = 0
        self.models: dict[str, ServedModel] = {}
        for model in config.models:
            replicas: dict[Role, ReplicaSet] = {}
            if model.base is not None:
                replicas["base"] = self._replica_set(model.base, "base")
            if model.nudging is not None:
                replicas["nudging"] = self._replica_set(model.nudging, "nudging")
            if model.nudging_base is not None:
                replicas["nudging_base"] = self._replica_set(model.nudging_base, "nudging_base")
            template = None
            if model.nudging is not None and model.nudging.chat_template not in (None, AUTO_TEMPLATE):
                template = get_chat_template(
                    model.nudging.chat_template,
                    bos_token=model.nudging.bos_token,
                    eos_token=model.nudging.eos_token,
                )
            admission = Admission(model.name, model.max_concurrent, model.max_queued,
                                  model.queue_timeout_seconds)
            self.models[model.name] = ServedModel(model, replicas, template, admission)

    def _replica_set(self, upstream: UpstreamConfig, role: Role) -> ReplicaSet:
        key = upstream.sharing_key(role)
        if key not in self._replicas:
            self._replicas[key] = ReplicaSet.connect(
                upstream.endpoints,
                upstream.model,
                role=role,
                api_key=upstream.api_key(),
                dialect=upstream.dialect,
                timeouts=upstream.timeouts,
                caps=upstream.answer_caps(),
                max_in_flight=upstream.max_in_flight,
                cooldown=upstream.cooldown_seconds,
            )
        return self._replicas[key]

    def report_down(self, url: str, problem: str | None) -> None:
        """Note why the server at `url` is down (None: it is back), for errors that need it."""
        for replicas in self._replicas.values():
            for client, health in zip(replicas.clients, replicas.healths, strict=True):
                if client.url == url:
                    health.down = problem
        self.down_reports += 1

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    async def readiness(self) -> dict[str, bool]:
        """By `model-name.role`: whether at least one replica of that upstream answers."""
        checks = {
            f"{name}.{role}": replicas.readiness()
            for name, served in self.models.items()
            for role, replicas in served.replicas.items()
        }
        results = await asyncio.gather(*checks.values())
        return {check: any(answers) for check, answers in zip(checks, results, strict=True)}

    async def template_problems(self) -> dict[str, str]:
        """By model name: why a `chat_template: auto` model's upstream cannot render its chat
        (a model without a template). Upstreams that do not answer are left to `readiness`."""

        async def problem(served: ServedModel) -> str | None:
            client = served.replicas["nudging"].pick()
            if (client.url, client.model) in self._renders:
                return None
            try:
                await client.render_chat([{"role": "user", "content": "Hi"}])
            except NoChatTemplate as error:
                return (f"chat_template: auto, but the {error.role} model's server has no chat template; "
                        f"set {error.role}.chat_template in the proxy's configuration")
            except UpstreamError:
                return None
            self._renders.add((client.url, client.model))
            return None

        auto = {name: served for name, served in self.models.items() if served.uses_upstream_template}
        found = await asyncio.gather(*(problem(served) for served in auto.values()))
        return {name: text for name, text in zip(auto, found, strict=True) if text is not None}

    async def aclose(self) -> None:
        await asyncio.gather(*(replicas.aclose() for replicas in self._replicas.values()))
