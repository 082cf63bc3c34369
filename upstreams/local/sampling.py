"""Choosing the next token and reporting logprobs from one position's logits, with numpy.

Everything here is O(vocabulary) vector work: llama.cpp hands us a float32 view of the logits,
and a 262k-entry vocabulary (Gemma 3) costs well under a millisecond per pass, where sorting
it in Python costs a third of a second. Logprobs are those of the raw distribution (before
temperature and top-p), as vLLM V1 reports them by default.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]

GREEDY_BELOW = 1e-5  # temperatures this small mean greedy, as in vLLM
_TOP_P_CANDIDATES = 512  # top-p is resolved among this many best tokens when they suffice


def log_normalizer(logits: Logits) -> float:
    """log(sum(exp(logits))), computed stably: logprob(t) = logits[t] - this."""
    peak = float(logits.max())
    return peak + float(np.log(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))


def top_k(logits: Logits, k: int) -> list[int]:
    """Ids of the k largest logits, best first (argpartition, then sort only those k)."""
    if k <= 0:
        return []
    k = min(k, logits.shape[0])
    if k == 1:
        return [int(logits.argmax())]
    candidates = np.argpartition(logits, -k)[-k:]
    order = np.argsort(-logits[candidates], kind="stable")
    return [int(i) for i in candidates[order]]


def choose(logits: Logits, temperature: float, top_p: float,
           rng: np.random.Generator | None) -> int:
    """Greedy (argmax) at temperature ~0; else a draw from softmax(logits / T) cut to top-p."""
    if temperature < GREEDY_BELOW or rng is None:
        return int(logits.argmax())
    scaled = (logits - logits.max()) / np.float32(temperature)
    probabilities = np.exp(scaled, dtype=np.float64)
    probabilities /= probabilities.sum()
    if top_p >= 1.0:
        cumulative = np.cumsum(probabilities)
        index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return min(index, int(probabilities.shape[0]) - 1)
    kept = _nucleus(probabilities, top_p)
    cumulative = np.cumsum(probabilities[kept])
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(kept[min(index, kept.shape[0] - 1)])


def _nucleus(probabilities: npt.NDArray[np.float64], top_p: float) -> npt.NDArray[np.intp]:
    """The smallest set of most likely ids whose mass reaches top_p, most likely first."""
    size = probabilities.shape[0]
    # Usually a few hundred tokens hold the mass: sort only those and fall back to a full
    # sort when they do not reach top_p.
    if size > _TOP_P_CANDIDATES:
        candidates = np.argpartition(probabilities, -_TOP_P_CANDIDATES)[-_TOP_P_CANDIDATES:]
        ordered = candidates[np.argsort(-probabilities[candidates], kind="stable")]
        cumulative = np.cumsum(probabilities[ordered])
        if cumulative[-1] < top_p:
            ordered = np.argsort(-probabilities, kind="stable")
            cumulative = np.cumsum(probabilities[ordered])
    else:
        ordered = np.argsort(-probabilities, kind="stable")
        cumulative = np.cumsum(probabilities[ordered])
    cut = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    return ordered[: min(cut, size)]
