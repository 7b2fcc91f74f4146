"""Search: embed a collection once (`python -m mrl_clip embed`), then query it at any prefix dim or through a
funnel (`python -m mrl_clip search`)."""
