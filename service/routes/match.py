"""POST /match and /match/batch: the cross-encoder's match probability for (caption, image) pairs."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException

from ...runtime.scoring import sigmoid
from ..admission import Work
from ..engine import BadInput, Engine, check_text, decode_in_thread
from ..schemas import MatchBatchRequest, MatchBatchResponse, MatchPair, MatchRequest, MatchResult
from ..settings import Settings
from ..state import State
from .deps import EngineDep, SettingsDep, StateDep, router as new_router

router = new_router()


async def match_pairs(pairs: list[MatchPair], eng: Engine, state: State, settings: Settings) -> list[MatchResult]:
    if len(pairs) > settings.max_match_pairs:
        raise BadInput(f"at most {settings.max_match_pairs} pairs per request")
    texts = [check_text(p.text, settings.max_text_chars) for p in pairs]
    rows = eng.index.rows_of([p.item_id for p in pairs if p.item_id is not None])
    for p in pairs:
        if p.item_id is not None and p.item_id not in rows:
            raise HTTPException(404, f"no item with id {p.item_id!r}")
    images = [await decode_in_thread(p.image, settings.max_image_bytes) for p in pairs if p.image is not None]
    with state.admission.admit(Work(texts=len(pairs), images=len(images), pairs=len(pairs))):
        decoded = iter(images)
        patches = []
        for p in pairs:
            if p.item_id is not None:
                patches.append((await eng.patch_states([rows[p.item_id]]))[0])
            else:
                patches.append((await eng.encode_image(next(decoded)))[1])
        encoded = await asyncio.gather(*(eng.encode_text(t) for t in texts))
        logits = await asyncio.gather(*(eng.match_logits(states, patch[None])
                                        for (_, states), patch in zip(encoded, patches)))
    probs = [float(sigmoid(lg)[0]) for lg in logits]
    return [MatchResult(score=p, match=p >= settings.match_threshold) for p in probs]


@router.post("/match", response_model=MatchResult)
async def match(req: MatchRequest, eng: EngineDep, state: StateDep, settings: SettingsDep):
    return (await match_pairs([req], eng, state, settings))[0]


@router.post("/match/batch", response_model=MatchBatchResponse)
async def match_batch(req: MatchBatchRequest, eng: EngineDep, state: StateDep, settings: SettingsDep):
    return MatchBatchResponse(results=await match_pairs(req.pairs, eng, state, settings))
