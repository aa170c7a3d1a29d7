"""Request and response bodies (pydantic v2). Unknown fields are rejected, so a typo is an error, not a
default; numbers must be finite."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# An id is one URL path segment (/items/{id}): no "/", no control characters.
ITEM_ID = r"^[^/\x00-\x1f\x7f]+$"


class SearchFilters(Strict):
    category: str | None = None
    subcategory: str | None = None
    gender: str | None = None
    price_min: float | None = Field(None, ge=0)
    price_max: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _range(self):
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError("price_min is above price_max")
        return self


class SearchRequest(Strict):
    text: str | None = Field(None, description="a text query (reranked by the cross-encoder)")
    image: str | None = Field(None, description="a base64 JPEG, PNG or WebP image: 'more like this' (recall only)")
    k: int = Field(10, ge=1, le=100)
    candidates: int = Field(100, ge=1, le=1000, description="recall depth")
    rerank: bool = True
    rerank_k: int = Field(20, ge=0, le=100)
    filters: SearchFilters | None = None

    @model_validator(mode="after")
    def _one_query(self):
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


class ResultItem(BaseModel):
    id: str
    name: str | None
    description: str | None
    category: str | None
    subcategory: str | None
    gender: str | None = None
    price: float | None = None
    image_url: str
    score: float
    recall_score: float
    match_probability: float | None = None
    rank: int


class SearchResponse(BaseModel):
    items: list[ResultItem]
    timings_ms: dict[str, float]
    reranked: int
    deadline_exceeded: bool
    rerank_error: str | None = Field(None, description="why the list is in recall order although a rerank was "
                                     "asked for (the rerank replicas down or overloaded); null otherwise")
    model_version: str
    index_version: str


class MatchPair(Strict):
    text: str
    image: str | None = Field(None, description="base64 JPEG, PNG or WebP")
    item_id: str | None = None

    @model_validator(mode="after")
    def _one_image(self):
        if (self.image is None) == (self.item_id is None):
            raise ValueError("give exactly one of image or item_id")
        return self


class MatchRequest(MatchPair):
    pass


class MatchBatchRequest(Strict):
    pairs: list[MatchPair] = Field(min_length=1)


class MatchResult(BaseModel):
    score: float = Field(description="match probability from the cross-encoder")
    match: bool


class MatchBatchResponse(BaseModel):
    results: list[MatchResult]


class NewItem(Strict):
    id: str = Field(min_length=1, max_length=200, pattern=ITEM_ID,
                    description="unique; any text without '/' or control characters")
    image: str = Field(description="base64 JPEG, PNG or WebP")
    name: str = ""
    description: str = ""
    category: str = Field(min_length=1)
    subcategory: str = Field(min_length=1)
    product_id: str | None = None
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _text(self):
        if not (self.name.strip() or self.description.strip()):
            raise ValueError("an item needs a name or a description")
        return self


class ItemOut(BaseModel):
    id: str
    product_id: str | None
    name: str | None
    description: str | None
    category: str | None
    subcategory: str | None
    gender: str | None
    price: float | None
    metadata: dict
    image_url: str


class Deleted(BaseModel):
    deleted: str


class ReloadRequest(Strict):
    variant: str | None = Field(None, max_length=100, description="a cross-encoder variant of the export "
                                "(default: the configured one, else the export's choice)")


class ReloadOut(BaseModel):
    reloaded: bool
    model: str
    index: str
    items: int


class Alive(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str | None = None
    index: str | None = None
    items: int | None = None
    read_only: bool | None = None
