"""The trainer: `python -m mrl_clip.train` (flags and set-up in main.py, one epoch and one step in loop.py)."""
