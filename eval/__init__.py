"""Evaluation: FID/KID, attention-vs-ATConv comparisons and benchmarks (installed as ``atdiff.eval``)."""
