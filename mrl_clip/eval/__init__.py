"""Evaluation at every nested dim: `python -m mrl_clip.eval {zeroshot,retrieval,linear-probe,cascade}`."""
