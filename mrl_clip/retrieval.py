"""`mrl_clip.retrieval`, kept for existing imports: the index lives in mrl_clip.search.index."""
from .search.index import (  # noqa: F401
    EmbeddingIndex,
    FunnelStage,
    SearchResult,
    format_funnel,
    parse_funnel,
)
