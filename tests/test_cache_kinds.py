"""Cache kinds (position-indexed KV, ring, recurrent state) through the executor, sessions and state files.

The ``*-v1.tws`` fixtures were written once by the state-file code before cache kinds existed (format version 1,
no kinds in the metadata; see tests/fixtures/states/README.md); they must keep loading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tensorweave as tw

FIXTURES = Path(__file__).parent / "fixtures"
V1_PARAMS = {"temperature": 1.3, "top_k": 40, "seed": 11}  # what the v1 fixtures' sessions sampled with
V1_PROMPTS = {"mistral": list(range(3, 15)), "qwen3": [5, 9, 13, 17, 21, 25]}


@pytest.mark.parametrize("family", sorted(V1_PROMPTS))
def test_version_1_state_files_still_restore(family: str) -> None:
    """mistral: both layers' rings wrapped (16 tokens, window 8); qwen3: plain KV caches. Saved at TP 2 (3:1),
    restored at TP 3 (2:1:1): the next logits match an uninterrupted run, and the sampler continues its stream."""
    path = FIXTURES / "states" / f"{family}-v1.tws"
    model = tw.load(FIXTURES / "models" / family / "hf", devices="cpu-sim:3", tensor_split=[2, 1, 1])
    ids = V1_PROMPTS[family]
    straight = model.generate(ids, 7, **V1_PARAMS)
    assert isinstance(straight, tw.runtime.session.Generation)
    resumed = model.restore(path)
    assert resumed.context == ids + straight.tokens[:4]
    rest = resumed.generate(None, 3)
    assert isinstance(rest, tw.runtime.session.Generation) and rest.tokens == straight.tokens[4:]
    after = [5, 6]
    whole = model.logits(ids + straight.tokens[:4] + after)[-2:]
    again = model.restore(path)  # (logits took the caches over)
    np.testing.assert_allclose(again.eval(after), whole, rtol=0, atol=1e-4)
