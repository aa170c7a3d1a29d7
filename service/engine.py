"""What the API runs: the exported model and the index, with inference off the event loop.

The text tower and the cross-encoder each run in one worker thread (MicroBatcher) that can gather
concurrent requests' work into shared runs: captions into one text-tower call, and (text states,
patch states) pairs into one cross-encoder call, up to `batch_max_pairs` pairs, waiting at most
`batch_wait_ms` for company. That cross-request batching is off by default (`batch_max_pairs` 1,
`batch_wait_ms` 0: each request's pairs run alone; service/settings.py says why); the other
stages run in threads of their own, so the event loop never blocks on inference.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalog.images import ImageDecodeError, decode_image, to_model_image
from ..catalog.items import CatalogItem
from ..index.search import LocalBackend, SearchPipeline, text_queries
from ..index.store import CatalogIndex
from ..runtime.exported import ExportedModel
from .settings import Settings


class BadInput(ValueError):
    """A request's content is unusable (the message says why); answered with 422."""


def check_text(text: str, max_chars: int) -> str:
    text = text.strip()
    if not text:
        raise BadInput("text is empty")
    if len(text) > max_chars:
        raise BadInput(f"text is over the {max_chars}-character limit")
    return text


def decode_base64_image(data: str, max_bytes: int) -> np.ndarray:
    """base64 (optionally a data: URL) -> the 256x256 model image."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > max_bytes * 4 // 3 + 4:
        raise BadInput(f"image is over the {max_bytes:,}-byte limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image is not valid base64") from None
    if not raw:
        raise BadInput("image is empty")
    try:
        return to_model_image(decode_image(raw))
    except ImageDecodeError as exc:
        raise BadInput(f"image: {exc}") from None


@dataclass
class _Job:
    inputs: object
    size: int
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """A worker thread that runs `fn(list of inputs) -> list of outputs` over gathered jobs."""

    def __init__(self, name: str, fn, max_size: int, max_wait_ms: float, on_batch=None):
        self.fn, self.max_size, self.max_wait = fn, max_size, max_wait_ms / 1000
        self.on_batch = on_batch
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, inputs, size: int = 1) -> Future:
        job = _Job(inputs, size)
        self.jobs.put(job)
        return job.future

    async def __call__(self, inputs, size: int = 1):
        return await asyncio.wrap_future(self.submit(inputs, size))

    def close(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, size = [job], job.size
            deadline = time.perf_counter() + self.max_wait
            while size < self.max_size:
                timeout = deadline - time.perf_counter()
                try:
                    nxt = self.jobs.get(timeout=max(timeout, 0)) if timeout > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
                size += nxt.size
            try:
                if self.on_batch:
                    self.on_batch(size)
                outputs = self.fn([j.inputs for j in batch])
                for j, out in zip(batch, outputs):
                    if not j.future.done():  # a request that gave up may have cancelled its future
                        j.future.set_result(out)
            except Exception as exc:  # handed to every waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)


class Engine(LocalBackend):
    """One loaded model + index and its search pipeline. A reload builds a new Engine beside the old and swaps."""

    def __init__(self, settings: Settings, model_dir: str | None = None, index_dir: str | None = None,
                 variant: str | None = None, on_batch=None):
        self.model_dir = Path(model_dir or settings.model_dir)
        self.index_dir = Path(index_dir or settings.index_dir)
        providers = [p.strip() for p in settings.providers.split(",") if p.strip()] if settings.providers else None
        model = ExportedModel(self.model_dir, variant=variant or settings.variant, threads=settings.threads,
                              providers=providers)
        super().__init__(model, CatalogIndex(self.index_dir, model_hash=model.model_hash, threads=settings.threads))
        self.model_version = f"{model.model_hash[:12]}/{model.variant}"
        self.text_batcher = MicroBatcher("text", lambda texts: text_queries(model.encode_text(texts)),
                                         settings.batch_max_pairs, settings.batch_wait_ms)
        self.cross_batcher = MicroBatcher("cross", model.rerank_jobs, settings.batch_max_pairs, settings.batch_wait_ms,
                                          on_batch)
        self.pipeline = SearchPipeline(self, model.manifest)

    @property
    def index_version(self) -> str:
        return f"{self.index.manifest['built']}/gen{self.index.generation()}"

    def close(self) -> None:
        self.text_batcher.close()
        self.cross_batcher.close()

    # The two batched stages; the others run in threads as LocalBackend's do.

    async def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return await self.text_batcher(text)

    async def match_logits(self, text_states: np.ndarray, patch_states: np.ndarray) -> np.ndarray:
        return await self.cross_batcher((text_states, patch_states), size=len(patch_states))

    async def add_item(self, item: CatalogItem) -> None:
        await asyncio.to_thread(self.index.add, [item], self.model)  # the index serialises its writes

    async def delete_item(self, item_id: str) -> bool:
        return not await asyncio.to_thread(self.index.delete, [item_id])
