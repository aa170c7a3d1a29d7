"""Admission by capacity: a request is admitted only while the model work already admitted, plus its
own, is predicted to finish within a share of the deadline.

Costs are measured as the server runs, per unit of work (a caption through the text tower, an
image through the image tower, a (caption, item) pair through the cross-encoder, a recall), as
moving averages of the workers' own run times, so they follow the machine, the model and the
load. The work ahead of a request runs on the same cores whichever stage it is in, so its
predicted completion is the sum of the admitted costs. Over the budget: 503 with a Retry-After of
when that work should be done, at once, instead of a rerank that would be computed and thrown
away at the deadline.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import Busy


class Ewma:
    def __init__(self, alpha: float = 0.1):
        self.alpha, self.value, self._lock = alpha, 0.0, threading.Lock()

    def observe(self, x: float) -> None:
        with self._lock:
            self.value = x if self.value == 0.0 else self.value + self.alpha * (x - self.value)


@dataclass
class Work:
    texts: int = 0
    images: int = 0
    pairs: int = 0
    recalls: int = 0


class Admission:
    def __init__(self, budget_s: float, on_change=None):
        self.budget_s = budget_s
        self.text_s, self.image_s, self.pair_s, self.recall_s = Ewma(), Ewma(), Ewma(), Ewma()
        self.pending_s = 0.0  # predicted seconds of admitted, unfinished work (changed on the event loop only)
        self.on_change = on_change or (lambda pending: None)

    def cost(self, work: Work) -> float:
        return (work.texts * self.text_s.value + work.images * self.image_s.value + work.pairs * self.pair_s.value
                + work.recalls * self.recall_s.value)

    @contextmanager
    def admit(self, work: Work):
        cost = self.cost(work)
        # One request is always admitted when nothing else is: the budget bounds queueing, not size.
        if self.pending_s > 0 and self.pending_s + cost > self.budget_s:
            wait = self.pending_s + cost - self.budget_s
            raise Busy(f"busy: {self.pending_s:.1f} s of work ahead, over this server's capacity; retry shortly",
                       max(1, math.ceil(wait)))
        self.pending_s += cost
        self.on_change(self.pending_s)
        try:
            yield
        finally:
            self.pending_s = max(0.0, self.pending_s - cost)
            self.on_change(self.pending_s)
