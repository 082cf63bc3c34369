"""The served models: their config, their upstream clients and the nudger's chat template."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nudging_core.templates import AUTO_TEMPLATE, ChatTemplate, get_chat_template
from nudging_core.types import Source
from nudging_core.upstream import UpstreamClient

from .config import Config, ModelConfig, UpstreamConfig


@dataclass(frozen=True, slots=True)
class ServedModel:
    config: ModelConfig
    clients: dict[Source, UpstreamClient]
    chat_template: ChatTemplate | None

    @property
    def uses_upstream_template(self) -> bool:
        nudging = self.config.nudging
        return nudging is not None and nudging.chat_template == AUTO_TEMPLATE


class ModelRegistry:
    """Builds one pooled client per distinct upstream and shares it between model names."""

    def __init__(self, config: Config) -> None:
        self._clients: dict[tuple[str, str, str | None, str, str], UpstreamClient] = {}
        self.models: dict[str, ServedModel] = {}
        for model in config.models:
            clients: dict[Source, UpstreamClient] = {}
            if model.base is not None:
                clients["base"] = self._client(model.base, "base")
            if model.nudging is not None:
                clients["nudging"] = self._client(model.nudging, "nudging")
            template = None
            if model.nudging is not None and model.nudging.chat_template not in (None, AUTO_TEMPLATE):
                template = get_chat_template(
                    model.nudging.chat_template,
                    bos_token=model.nudging.bos_token,
                    eos_token=model.nudging.eos_token,
                )
            self.models[model.name] = ServedModel(model, clients, template)

    def _client(self, upstream: UpstreamConfig, role: Source) -> UpstreamClient:
        key = (upstream.url, upstream.model, upstream.api_key_env, upstream.dialect, role)
        if key not in self._clients:
            self._clients[key] = UpstreamClient(
                upstream.url,
                upstream.model,
                role=role,
                api_key=upstream.api_key(),
                dialect=upstream.dialect,
                timeouts=upstream.timeouts.to_timeouts(),
                max_in_flight=upstream.max_in_flight,
            )
        return self._clients[key]

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    async def readiness(self) -> dict[str, bool]:
        """Whether each distinct upstream answers, by `model-name.role`."""
        checks = {
            f"{name}.{role}": client.ready()
            for name, served in self.models.items()
            for role, client in served.clients.items()
        }
        results = await asyncio.gather(*checks.values())
        return dict(zip(checks, results, strict=True))

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients.values()))
