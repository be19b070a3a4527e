"""Run the service under uvicorn so that a stop signal also refuses queued inference at once.

uvicorn's graceful shutdown waits for every request in flight; queued images would be computed for
clients about to be cut off. Here SIGTERM/SIGINT first fails the queued work with 503 + Retry-After (the
client retries on another replica), lets a forward pass already running finish, and never waits longer
than `shutdown_timeout_s`.
"""

from __future__ import annotations

from types import FrameType

import uvicorn

from fieldkube.serving.app import create_app
from fieldkube.serving.service import Service
from fieldkube.serving.settings import ServeSettings


class ServiceServer(uvicorn.Server):
    """uvicorn's server, telling the service when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)


def serve(settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    service = Service(settings)
    config = uvicorn.Config(
        create_app(settings, service),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    ServiceServer(config, service).run()
