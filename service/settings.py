"""Service settings, from the environment (prefix FASHIONBERT_) or a .env file."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASHIONBERT_", env_file=".env", extra="ignore")

    model_dir: str = "data/model"
    index_dir: str = "data/index"
    variant: str | None = Field(None, description="cross-encoder variant; default: the export's choice")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime and FAISS threads; default: all cores")
    providers: str | None = Field(None, description="ONNX Runtime execution providers, comma-separated "
                                  "(e.g. CUDAExecutionProvider,CPUExecutionProvider); default: CPU")
    # Secure by default: without a key, POST/DELETE /items and /admin/reload answer 403.
    api_key: str | None = Field(None, description="enables POST/DELETE /items and /admin/reload, which then need "
                                "it in the X-API-Key header; unset, they answer 403")
    # The Host headers served; anything else is refused (a DNS-rebinding page cannot reach a
    # loopback server under a name of its own). "*" serves any.
    allowed_hosts: str = Field("127.0.0.1,localhost,::1", description="comma-separated Host names served, or *")
    index_read_only: bool | None = Field(None, description="serve the index read-only; default: when its "
                                         "directory is not writable")
    recall: str | None = Field(None, description="milvus://HOST:PORT/COLLECTION to recall from instead of the one "
                                                 "the index was built with")
    rerankers: str | None = Field(None, description="http://HOST:PORT of cross-encoder replicas on Ray Serve "
                                  "(`fashionbert rerankers`) to run /search's rerank on; default: in this process")

    max_body_bytes: int = Field(12 * 1024 * 1024, ge=1024, description="request bodies, chunked or not")
    max_text_chars: int = Field(1000, ge=1)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_match_pairs: int = Field(64, ge=1)
    max_concurrency: int = Field(16, ge=1, description="requests in flight; beyond it 503 with Retry-After")
    queue_wait_ms: float = Field(200.0, ge=0, description="how long a request may wait for a slot before the 503")
    retry_after_s: int = Field(1, ge=1)
    deadline_ms: float = Field(2000.0, gt=0, description="after this, /search returns the recall order, flagged")
    # Admission by capacity: a request is admitted only while the model work already admitted,
    # plus its own, is predicted to finish within this share of the deadline (costs measured
    # as the server runs). Beyond it, 503 at once rather than a rerank computed and thrown away.
    admission_headroom: float = Field(0.6, gt=0, le=10, description="share of deadline_ms the admitted work may "
                                      "fill; 0.6 leaves room for the measurement's noise")
    # Micro-batching across requests. On the 2-core CPU it measured slower than running each
    # request's pairs alone (the cross-encoder is already matrix-product bound at K = 20, and a
    # bigger run only makes early requests wait for late ones; BENCHMARKS.md), so the default
    # runs each request alone. Where batches are nearly free (a GPU): 64 pairs and 2-5 ms.
    batch_max_pairs: int = Field(1, ge=1, description="micro-batching: most cross-encoder pairs (texts) in one run")
    batch_wait_ms: float = Field(0.0, ge=0, description="micro-batching: how long a run waits for company")
    match_threshold: float = Field(0.5, ge=0, le=1)

    def hosts(self) -> set[str] | None:
        """The allowed Host names (lowercase, no port), or None for any."""
        names = {h.strip().lower().strip("[]") for h in self.allowed_hosts.split(",") if h.strip()}
        return None if "*" in names else names
