"""The engine reproduces the original implementation's vectors (fixtures/jina-v3-tiny/golden.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.request import EmbedRequest

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"

COSINE = 0.99999


def cosines(a: np.ndarray, b) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_task_and_matryoshka_size_matches_the_original(engine, golden):
    checked = 0
    for case in golden["outputs"]:
        if case["task"] is None:
            continue  # the no-adapter case is covered below through the model
        result = engine.embed(EmbedRequest(texts=golden["texts"], task=case["task"], dimensions=case["dimensions"]))
        expected = np.asarray(case["embeddings"])
        assert result.embeddings.shape == expected.shape
        assert cosines(result.embeddings, expected).min() >= COSINE, (case["task"], case["dimensions"])
        np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
        checked += 1
    assert checked == 15


def test_base_model_without_adapter_matches_the_original(engine, golden):
    from inference.engine import Sequence

    texts = golden["texts"]
    seqs = [Sequence(None, e.ids, np.full(len(e.ids), i)) for i, e in enumerate(engine.tokenizer.encode_batch(texts))]
    sums, counts = engine._run(seqs, len(seqs))
    pooled = (sums / counts[:, None]).numpy()
    case = next(c for c in golden["outputs"] if c["task"] is None and c["dimensions"] is None)
    assert cosines(pooled, case["embeddings"]).min() >= COSINE


def test_token_embeddings_of_the_long_text(engine, golden):
    ref = golden["token_embeddings_text5_text_matching"]
    ids = engine.tokenizer.encode(golden["texts"][5]).ids
    assert ids == ref["input_ids"] or len(ids) == len(ref["input_ids"])
    import torch

    hidden = engine.model.forward_packed(torch.tensor(ids), [len(ids)], ["text-matching"]).numpy()
    assert len(ids) > 1300  # positions far past 512 exercise the rotary embedding
    assert cosines(hidden[:8], ref["first8_tokens"]).min() >= COSINE
    assert cosines(hidden.mean(0, keepdims=True), [ref["mean_all"]]).min() >= COSINE


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_late_chunking_matches_the_original(engine, golden, index):
    case = golden["late_chunking"][index]
    result = engine.embed(EmbedRequest(texts=case["chunks"], task=case["task"], late_chunking=True))
    assert result.embeddings.shape == (len(case["chunks"]), len(case["embeddings"][0]))
    assert cosines(result.embeddings, case["embeddings"]).min() >= COSINE
    sequences, _ = engine._late_chunking(case["chunks"], case["task"], 0)
    slots = sequences[0].slots
    spans = [[int(np.flatnonzero(slots == c).min()), int(np.flatnonzero(slots == c).max()) + 1] for c in range(len(case["chunks"]))]
    assert spans == case["spans"]


def test_fixture_is_the_released_layout():
    from inference.checkpoint import validate_checkpoint

    info = validate_checkpoint(FIXTURE)
    assert info["layout"] == "released"
    assert info["tasks"] == ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
