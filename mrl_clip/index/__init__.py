"""`python -m mrl_clip.index build|info`: the funnel index file. The code lives in mrl_clip.search (build, store)."""
