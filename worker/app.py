"""The worker's Celery app: the shared one (``ratequeue.queue``) with the worker's task and
signal handlers, built from settings by a function (nothing is created at import)."""

from __future__ import annotations

from celery import Celery, Task, signals

from ratequeue.config.accounts import AccountTable
from ratequeue.config.settings import Settings
from ratequeue.queue import RUN_CHUNK, create_app
from ratequeue.worker.tasks import WorkerRuntime

__all__ = ["build_worker"]


def build_worker(settings: Settings, accounts: AccountTable | None = None) -> tuple[Celery, WorkerRuntime]:
    """A Celery app for ``settings`` with ratequeue's task registered, and the runtime behind it
    (`accounts`: the models file's, read with ``require_credentials=False`` unless given)."""
    app = create_app(settings)
    runtime = WorkerRuntime(settings, app, accounts)

    def run_chunk(self: Task, batch_id: str, custom_ids: list[str]) -> dict[str, object]:
        return runtime.run_chunk(self, batch_id, custom_ids)

    app.task(name=RUN_CHUNK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run_chunk)
    # weak=False: the handlers are bound methods of a runtime nothing else may hold on to.
    signals.worker_ready.connect(runtime.on_ready, weak=False)
    signals.worker_shutting_down.connect(runtime.on_shutting_down, weak=False)
    signals.worker_process_shutdown.connect(runtime.on_child_exited, weak=False)
    signals.worker_shutdown.connect(runtime.on_shutdown, weak=False)
    return app, runtime
