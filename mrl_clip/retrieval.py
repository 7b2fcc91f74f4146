"""`mrl_clip.retrieval`, kept for existing imports: the index lives in mrl_clip.search.index, its file in
mrl_clip.search.store."""
from .search.index import (  # noqa: F401
    EmbeddingIndex,
    FunnelStage,
    SearchResult,
    format_funnel,
    parse_funnel,
)
from .search.store import Stage1Spec, build_index, load_index, parse_stage1, save_index  # noqa: F401
