"""Text embeddings for the semantic response cache: the pluggable protocol and the default model.

The default, :class:`WordLlamaEmbedder`, is WordLlama's ``l2_supercat`` model
(token embeddings distilled from Llama 2 70B, 256 dimensions, averaged over
the text's tokens): its weights and tokenizer ship inside the ``wordllama``
wheel on PyPI (the ``semantic`` extra), so nothing is downloaded at run time
and it runs offline on a CPU in microseconds per text.

This module needs numpy (it comes with the extra); :mod:`runtime.llm.cache`
imports it only for a cache with a semantic threshold.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Embedder", "WordLlamaEmbedder", "best_match", "from_bytes", "unit_vectors"]

#: What to install for the default embedder.
EXTRA_HINT = "pip install 'agentrt[semantic]'"

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into vectors; similar meanings give vectors at a small angle.

    ``name`` identifies the model (and its version or dimensions): the cache
    compares a request only with entries embedded by the same ``name``.
    ``embed`` returns one vector per text, as an (n, d) array or a list of
    lists of floats; it runs in a worker thread.
    """

    @property
    def name(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> Any: ...


class WordLlamaEmbedder:
    """The default offline embedder: WordLlama ``l2_supercat``, 256-d, bundled in its wheel."""

    name = "wordllama/l2_supercat_256"

    def embed(self, texts: Sequence[str]) -> Vectors:
        model = _wordllama()
        out: Vectors = model.embed(list(texts), norm=False)
        return out


@functools.cache
def _wordllama() -> Any:
    """The model, loaded once per process from the files inside the ``wordllama`` package.

    Built from its parts rather than with ``WordLlama.load()``: in wordllama
    0.4 ``load()`` looks for the bundled tokenizer in a folder the wheel does
    not have (``tokenizer/`` instead of ``tokenizers/``) and then fetches it
    from the Hugging Face hub. Importing ``wordllama.inference`` also calls
    ``logging.basicConfig``; the root logger is put back as it was.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from safetensors.numpy import load_file
        from wordllama.inference import WordLlamaInference
        from wordllama.tokenizers import tokenizer_from_file
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            f"the default semantic-cache embedder needs wordllama: {EXTRA_HINT} "
            f"(or give Cache(embedder=...) your own): {exc}"
        ) from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    weights = resources.files("wordllama") / "weights" / "l2_supercat_256.safetensors"
    with resources.as_file(weights) as path:
        tensors = load_file(str(path))
    tokenizer = tokenizer_from_file("l2_supercat_tokenizer_config.json")
    return WordLlamaInference(tensors["embedding.weight"], tokenizer)


def unit_vectors(raw: Any, count: int) -> list[Vectors | None]:
    """An embedder's output as ``count`` unit vectors (None for a zero or non-finite one)."""
    array = np.asarray(raw, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != count:
        raise ValueError(
            f"an embedder must return {count} vectors as an (n, d) array, got shape {array.shape}"
        )
    out: list[Vectors | None] = []
    for row in array:
        norm = float(np.linalg.norm(row))
        out.append(row / norm if norm > 0 and math.isfinite(norm) else None)
    return out


def from_bytes(data: bytes) -> Vectors:
    """A stored embedding (little-endian float32 bytes) as a vector."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def best_match(
    probe: Vectors, candidates: Sequence[Vectors], threshold: float
) -> tuple[int, float] | None:
    """The most similar candidate (its index and cosine) if it reaches ``threshold``.

    Brute force: a matrix product over the candidates (the agent's most recent
    entries for one context), which for a few thousand 256-d vectors takes well
    under a millisecond; no vector index is needed at that size. Candidates of
    another length (a changed embedder under the same name) are never similar.
    """
    rows = [i for i, c in enumerate(candidates) if len(c) == probe.shape[0]]
    if not rows:
        return None
    matrix = np.stack([candidates[i] for i in rows])
    scores = matrix @ probe
    best = int(np.argmax(scores))
    score = float(scores[best])
    if score < threshold:
        return None
    return rows[best], score
