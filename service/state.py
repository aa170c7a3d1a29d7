"""The serving state: the engine in use, its loading and its swap on reload."""

from __future__ import annotations

import asyncio
import logging
import threading

from .engine import Engine
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("fashionbert.service")


class State:
    """Requests take `engine` once and keep it to the end, so a swap never changes one mid-request."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine: Engine | None = None
        self.loading = True
        self.load_error: str | None = None
        self.reload_lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.max_concurrency)

    def new_engine(self, model_dir: str | None = None, index_dir: str | None = None,
                   variant: str | None = None) -> Engine:
        return Engine(self.settings, model_dir, index_dir, variant, on_batch=self.metrics.batch.observe)

    def load_initial(self) -> None:
        """The engine of the settings' model and index (run beside the event loop: it takes seconds)."""
        try:
            self.set_engine(self.new_engine())
            log.info("Serving %s with index %s (%d items).", self.engine.model_version, self.settings.index_dir,
                     len(self.engine.index))
        except Exception as exc:  # the message is what /readyz says
            self.load_error = str(exc)
            log.error("Could not load the model and index: %s", exc)
        finally:
            self.loading = False

    def set_engine(self, engine: Engine) -> None:
        old, self.engine = self.engine, engine
        self.metrics.build.info({"model": engine.model_version, "index": str(engine.index_dir),
                                 "model_dir": str(engine.model_dir)})
        self.metrics.index_size.set(len(engine.index))
        if old is not None:
            # Requests in flight hold their own reference to the old engine: stop its workers
            # only once they have surely finished.
            timer = threading.Timer(max(60.0, self.settings.deadline_ms / 1000 * 4), old.close)
            timer.daemon = True
            timer.start()
