"""The serving state: the engine in use, its loading, its swap on reload, and admission."""

from __future__ import annotations

import asyncio
import logging
import time

from ..index.milvus import MilvusError, MilvusUnavailable
from .admission import Admission
from .engine import Engine
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("fashionbert.service")
RECALL_RETRY_S = 5


class State:
    """Requests take `engine` once (`acquire`) and keep it to the end (`release`), so a swap never
    changes one mid-request; a replaced engine is closed when its last request lets go."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine: Engine | None = None
        self.loading = True
        self.load_error: str | None = None
        self.reload_lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.admission = Admission(settings.admission_headroom * settings.deadline_ms / 1000,
                                   on_change=metrics.admitted_work.set)
        self.retired: set[Engine] = set()

    def new_engine(self, variant: str | None = None) -> Engine:
        """An engine of the configured model and index directories (never paths from a request)."""
        settings = self.settings if variant is None else self.settings.model_copy(update={"variant": variant})
        return Engine(settings, self.admission, on_batch=self.metrics.batch.observe)

    def load_initial(self) -> None:
        """The engine of the settings' model and index (run beside the event loop: it takes seconds).
        A recall server (Milvus) that cannot be reached yet is waited for, as a database would be."""
        try:
            while True:
                try:
                    engine = self.new_engine()
                    break
                except MilvusError as exc:
                    if not isinstance(exc, MilvusUnavailable) and "unavailable" not in str(exc).lower():
                        raise
                    self.load_error = str(exc)
                    log.warning("%s; trying again in %d s.", exc, RECALL_RETRY_S)
                    time.sleep(RECALL_RETRY_S)
            self.load_error = None
            self.set_engine(engine)  # the first engine: no old one to hand over, safe from this thread
            log.info("Serving %s with index %s (%d items%s).", engine.model_version, self.settings.index_dir,
                     len(engine.index), ", read-only" if engine.index.read_only else "")
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
            old.retired = True
            self.retired.add(old)
            self._close_if_idle(old)

    def acquire(self) -> Engine | None:
        engine = self.engine
        if engine is not None:
            engine.users += 1
        return engine

    def release(self, engine: Engine) -> None:
        engine.users -= 1
        self._close_if_idle(engine)

    def _close_if_idle(self, engine: Engine) -> None:
        if engine.retired and engine.users == 0 and engine in self.retired:
            self.retired.discard(engine)
            engine.close()
            log.info("Released the previous engine (%s): its last request has finished.", engine.model_version)
        self.metrics.engines_retired.set(len(self.retired))

    def close(self) -> None:
        for engine in [self.engine, *self.retired]:
            if engine is not None:
                engine.close()
