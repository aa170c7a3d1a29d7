"""The catalog's items: read one and its image; add and delete (with the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from ...catalog.items import CatalogItem
from ..engine import Engine, decode_base64_image
from ..schemas import ItemOut, NewItem
from .deps import EngineDep, MetricsDep, SettingsDep, image_url, require_api_key

router = APIRouter()

FIELDS = ("id", "product_id", "name", "description", "category", "subcategory", "gender", "price", "metadata")


def item_out(eng: Engine, item_id: str) -> ItemOut:
    m = eng.index.item(item_id)
    if m is None:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return ItemOut(**{k: m[k] for k in FIELDS}, image_url=image_url(item_id))


def refuse_hnsw(eng: Engine, what: str) -> None:
    if eng.index.config.kind == "hnsw":
        raise HTTPException(409, f"this index is hnsw (rebuild-only): it cannot {what}")


@router.get("/items/{item_id}", response_model=ItemOut)
async def get_item(item_id: str, eng: EngineDep):
    return item_out(eng, item_id)


@router.get("/items/{item_id}/image")
async def get_image(item_id: str, eng: EngineDep):
    data = eng.index.image(item_id)
    if data is None:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.post("/items", status_code=201, response_model=ItemOut, dependencies=[Depends(require_api_key)])
async def add_item(req: NewItem, eng: EngineDep, settings: SettingsDep, metrics: MetricsDep):
    refuse_hnsw(eng, "take new items")
    if eng.index.item(req.id) is not None:
        raise HTTPException(409, f"an item with id {req.id!r} exists: delete it first")
    pixels = decode_base64_image(req.image, settings.max_image_bytes)
    item = CatalogItem(id=req.id, product_id=req.product_id or req.id, name=req.name, description=req.description,
                       category=req.category, subcategory=req.subcategory, split="all", metadata=dict(req.metadata),
                       image=pixels)
    try:
        await eng.add_item(item)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    metrics.index_size.set(len(eng.index))
    return item_out(eng, req.id)


@router.delete("/items/{item_id}", dependencies=[Depends(require_api_key)])
async def delete_item(item_id: str, eng: EngineDep, metrics: MetricsDep):
    refuse_hnsw(eng, "delete items")
    if not await eng.delete_item(item_id):
        raise HTTPException(404, f"no item with id {item_id!r}")
    metrics.index_size.set(len(eng.index))
    return {"deleted": item_id}
