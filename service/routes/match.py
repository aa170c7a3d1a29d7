"""POST /match and /match/batch: the cross-encoder's match probability for (caption, image) pairs."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException

from ...runtime.scoring import sigmoid
from ..engine import BadInput, Engine, check_text, decode_base64_image
from ..schemas import MatchBatchRequest, MatchBatchResponse, MatchPair, MatchRequest, MatchResult
from ..settings import Settings
from .deps import EngineDep, SettingsDep

router = APIRouter()


async def match_pairs(pairs: list[MatchPair], eng: Engine, settings: Settings) -> list[MatchResult]:
    if len(pairs) > settings.max_match_pairs:
        raise BadInput(f"at most {settings.max_match_pairs} pairs per request")
    texts = [check_text(p.text, settings.max_text_chars) for p in pairs]
    patches = []
    for p in pairs:
        if p.item_id is not None:
            row = eng.index.rows_of([p.item_id]).get(p.item_id)
            if row is None:
                raise HTTPException(404, f"no item with id {p.item_id!r}")
            patches.append((await eng.patch_states([row]))[0])
        else:
            _, states = await eng.encode_image(decode_base64_image(p.image, settings.max_image_bytes))
            patches.append(states)
    encoded = await asyncio.gather(*(eng.encode_text(t) for t in texts))
    logits = await asyncio.gather(*(eng.match_logits(states, patch[None]) for (_, states), patch in zip(encoded, patches)))
    probs = [float(sigmoid(lg)[0]) for lg in logits]
    return [MatchResult(score=p, match=p >= settings.match_threshold) for p in probs]


@router.post("/match", response_model=MatchResult)
async def match(req: MatchRequest, eng: EngineDep, settings: SettingsDep):
    return (await match_pairs([req], eng, settings))[0]


@router.post("/match/batch", response_model=MatchBatchResponse)
async def match_batch(req: MatchBatchRequest, eng: EngineDep, settings: SettingsDep):
    return MatchBatchResponse(results=await match_pairs(req.pairs, eng, settings))
