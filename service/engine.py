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
import ctypes
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalog.images import API_IMAGE_FORMATS, MODEL_IMAGE_SIZE, ImageDecodeError, decode_image, to_model_image
from ..catalog.items import CatalogItem
from ..index.search import LocalBackend, SearchPipeline, text_queries
from ..index.store import CatalogIndex
from ..runtime.exported import ExportedModel
from .admission import Admission
from .errors import BadInput
from .settings import Settings

log = logging.getLogger(__name__)


def check_text(text: str, max_chars: int) -> str:
    text = text.strip()  # unpaired surrogates were refused with the body (service/http.py)
    if not text:
        raise BadInput("text is empty")
    if len(text) > max_chars:
        raise BadInput(f"text is over the {max_chars}-character limit")
    return text


def decode_base64_image(data: str, max_bytes: int) -> np.ndarray:
    """base64 (optionally a data: URL) -> the 256x256 model image. Seconds for a big image: run it
    in a worker thread (`decode_in_thread`)."""
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
        return to_model_image(decode_image(raw, formats=API_IMAGE_FORMATS))
    except ImageDecodeError as exc:
        raise BadInput(f"image: {exc}") from None


async def decode_in_thread(data: str, max_bytes: int) -> np.ndarray:
    return await asyncio.to_thread(decode_base64_image, data, max_bytes)


@dataclass
class _Job:
    inputs: object
    size: int
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """A worker thread that runs `fn(list of inputs) -> list of outputs` over gathered jobs;
    `on_batch(size, seconds)` after each run."""

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
                started = time.perf_counter()
                outputs = self.fn([j.inputs for j in batch])
                if self.on_batch:
                    self.on_batch(size, time.perf_counter() - started)
                for j, out in zip(batch, outputs):
                    if not j.future.done():  # a request that gave up may have cancelled its future
                        j.future.set_result(out)
            except Exception as exc:  # handed to every waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)


class Engine(LocalBackend):
    """One loaded model + index and its search pipeline. A reload builds a new Engine beside the old
    and swaps; the old one is closed when its last request finishes (service/state.py)."""

    def __init__(self, settings: Settings, admission: Admission, on_batch=None):
        self.model_dir, self.index_dir = Path(settings.model_dir), Path(settings.index_dir)
        self.admission = admission
        providers = [p.strip() for p in settings.providers.split(",") if p.strip()] if settings.providers else None
        model = ExportedModel(self.model_dir, variant=settings.variant, threads=settings.threads, providers=providers)
        index = CatalogIndex(self.index_dir, model_hash=model.model_hash, threads=settings.threads,
                             read_only=settings.index_read_only, recall=settings.recall)
        super().__init__(model, index)
        self.model_version = f"{model.model_hash[:12]}/{model.variant}"
        self.users = 0  # requests holding this engine (changed on the event loop)
        self.retired = False

        def on_cross(pairs: int, seconds: float) -> None:
            admission.pair_s.observe(seconds / pairs)
            if on_batch:
                on_batch(pairs)

        self.text_batcher = MicroBatcher("text", lambda texts: text_queries(model.encode_text(texts)),
                                         settings.batch_max_pairs, settings.batch_wait_ms,
                                         lambda n, seconds: admission.text_s.observe(seconds / n))
        self.cross_batcher = MicroBatcher("cross", model.rerank_jobs, settings.batch_max_pairs, settings.batch_wait_ms,
                                          on_cross)
        # The rerank on Ray Serve replicas (service/rerankers.py) instead of this process's cross-encoder.
        self.remote = None
        if settings.rerankers:
            from .rerank_client import RerankClient

            self.remote = RerankClient(settings.rerankers, model.model_hash, index.manifest["built"])
        self.pipeline = SearchPipeline(self, model.manifest)
        self._warm_up()

    def _warm_up(self) -> None:
        """One run of each stage: the first requests do not pay ONNX Runtime's first-run cost, and
        admission starts with measured costs."""
        text = self.text_batcher.submit("warm up").result()
        started = time.perf_counter()
        _, states = self.model.encode_images(np.full((1, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3), 255, dtype=np.uint8))
        self.admission.image_s.observe(time.perf_counter() - started)
        self.cross_batcher.submit((text[1], np.repeat(states, 20, axis=0)), 20).result()
        started = time.perf_counter()
        self.index.search(text[0], 100)
        self.admission.recall_s.observe(time.perf_counter() - started)
        if self.remote is not None:
            from ..index.search import RerankUnavailable

            try:
                found = self.remote.probe()
                log.info("Reranking on the replicas at %s (a replica holds model %s).", self.remote.url,
                         str(found.get("model"))[:12])
            except RerankUnavailable as exc:
                log.warning("%s: searches return the recall order until they answer.", exc)

    @property
    def index_version(self) -> str:
        return f"{self.index.manifest['built']}/gen{self.index.generation()}"

    def close(self) -> None:
        """Stop the workers and let go of the model and index, so their memory goes back to the
        system even while something still holds this object (a request's stored traceback)."""
        self.text_batcher.close()
        self.cross_batcher.close()
        if self.remote is not None:
            self.remote.close()
        self.index.close()
        self.model = self.pipeline = self.text_batcher = self.cross_batcher = None
        threading.Thread(target=_return_memory, name="return-memory", daemon=True).start()


    # The two batched stages; the others run in threads as LocalBackend's do, measured.

    async def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return await self.text_batcher(text)

    async def match_logits(self, text_states: np.ndarray, patch_states: np.ndarray) -> np.ndarray:
        return await self.cross_batcher((text_states, patch_states), size=len(patch_states))

    async def rerank_logits(self, text: str, text_states: np.ndarray, rows: list[int],
                            deadline: float | None) -> np.ndarray | None:
        if self.remote is None:
            return await super().rerank_logits(text, text_states, rows, deadline)
        # Not measured into admission's pair cost: the replicas' cores do this work, and they shed
        # their own load (503 -> the recall order, flagged); the deadline bounds the wait here.
        return await self.remote.logits(text, rows, deadline)

    async def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        out = await super().encode_image(pixels)
        self.admission.image_s.observe(time.perf_counter() - started)
        return out

    async def recall(self, embedding: np.ndarray, n: int, filters):
        started = time.perf_counter()
        out = await super().recall(embedding, n, filters)
        self.admission.recall_s.observe(time.perf_counter() - started)
        return out

    async def add_item(self, item: CatalogItem) -> None:
        await asyncio.to_thread(self.index.add, [item], self.model)  # the index serialises its writes

    async def delete_item(self, item_id: str) -> bool:
        return not await asyncio.to_thread(self.index.delete, [item_id])


def _return_memory() -> None:
    """After a reload: hand the old engine's freed heap back to the system (glibc keeps it in its
    per-thread arenas otherwise, and each reload's sessions would stay resident). No gc.collect():
    close() already broke the references, and a full collection would hold the GIL for a while."""
    time.sleep(1.0)  # its worker threads finish their last run first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
