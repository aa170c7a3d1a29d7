"""The catalog's items: read one and its image; add and delete (with the API key)."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import Response

from ...catalog.items import CatalogItem
from ...index.milvus import MilvusError
from ..admission import Work
from ..engine import Engine, decode_in_thread
from ..schemas import Deleted, ItemOut, NewItem
from .deps import EngineDep, KeyDep, MetricsDep, SettingsDep, StateDep, image_url, router as new_router

router = new_router()

FIELDS = ("id", "product_id", "name", "description", "category", "subcategory", "gender", "price", "metadata")


def item_out(eng: Engine, item_id: str) -> ItemOut:
    m = eng.index.item(item_id)
    if m is None:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return ItemOut(**{k: m[k] for k in FIELDS}, image_url=image_url(item_id))


def refuse_unwritable(eng: Engine, what: str) -> None:
    if eng.index.config.kind == "hnsw" and eng.index.recall is None:  # Milvus' HNSW takes writes
        raise HTTPException(409, f"this index is hnsw (rebuild-only): it cannot {what}")
    if eng.index.read_only:
        raise HTTPException(409, f"this index is served read-only (its directory is not writable): it cannot {what}")


@router.get("/items/{item_id}", response_model=ItemOut)
async def get_item(item_id: str, eng: EngineDep):
    return item_out(eng, item_id)


@router.get("/items/{item_id}/image", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the item's image (JPEG)"}})
async def get_image(item_id: str, eng: EngineDep):
    data = eng.index.image(item_id)
    if data is None:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.post("/items", status_code=201, response_model=ItemOut, dependencies=KeyDep)
async def add_item(req: NewItem, eng: EngineDep, state: StateDep, settings: SettingsDep, metrics: MetricsDep):
    refuse_unwritable(eng, "take new items")
    if eng.index.item(req.id) is not None:
        raise HTTPException(409, f"an item with id {req.id!r} exists: delete it first")
    pixels = await decode_in_thread(req.image, settings.max_image_bytes)
    item = CatalogItem(id=req.id, product_id=req.product_id or req.id, name=req.name, description=req.description,
                       category=req.category, subcategory=req.subcategory, split="all", metadata=dict(req.metadata),
                       image=pixels)
    with state.admission.admit(Work(images=1)):
        try:
            await eng.add_item(item)
        except MilvusError:
            raise
        except ValueError as exc:  # an id added meanwhile, ReadOnlyIndex, or the directory rebuilt under this engine
            raise HTTPException(409, str(exc)) from None
    metrics.index_size.set(len(eng.index))
    return item_out(eng, req.id)


@router.delete("/items/{item_id}", response_model=Deleted, dependencies=KeyDep)
async def delete_item(item_id: str, eng: EngineDep, metrics: MetricsDep):
    refuse_unwritable(eng, "delete items")
    try:
        found = await eng.delete_item(item_id)
    except MilvusError:
        raise
    except ValueError as exc:  # ReadOnlyIndex, or the directory rebuilt under this engine
        raise HTTPException(409, str(exc)) from None
    if not found:
        raise HTTPException(404, f"no item with id {item_id!r}")
    metrics.index_size.set(len(eng.index))
    return Deleted(deleted=item_id)
