"""`nudging-proxy eval`: the paper's experiments (base_only, nudging_only, nudging and the
baselines proxy_tuning and ensemble) over its 13 datasets and generated synthetic tasks,
scored by rules (or an optional LLM judge), with resumable JSONL results and summaries."""
