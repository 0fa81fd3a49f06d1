"""Conformance, end to end: models split over the first 1..N devices of the backend (uneven split, the chosen
communicator; one real rank per device for a communicator with one process per rank) against cpu-sim at TP=1:
logits NMSE <= 1e-4 for the prompt and each decode step."""

from __future__ import annotations

import numpy as np
import pytest

from ..errors import UnsupportedError
from .cases import MODEL_NMSE, ModelCase, compare, model_cases, split_for
from .plugin import KIT, Kit, RecordProperty, param_ids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    kit = metafunc.config.stash.get(KIT, None)
    tps = range(1, (kit.world_size if kit else 1) + 1)
    values = [(c, tp) for c in model_cases(kit.models_dir if kit else None) for tp in tps]
    ids = param_ids([{"model": c.name, "tp": tp} for c, tp in values], lead="model")
    metafunc.parametrize(("case", "tp"), values, ids=ids)


_reference: dict[ModelCase, list[np.ndarray]] = {}  # cpu-sim TP=1 logits per step, computed once per model


def test_model(kit: Kit, case: ModelCase, tp: int, record_property: RecordProperty) -> None:
    devs, comm = kit.group(), kit.communicator
    in_ranks = not comm.capabilities.in_process  # one process per rank: tp real ranks ran the model
    if tp > len(devs) and not in_ranks:
        kit.not_supported(f"TP={tp}: only {len(devs)} device(s) to test on (--devices)")
    if case not in _reference:
        _reference[case] = case.logits("cpu-sim:1", "local")
    try:
        got = kit.ranks(tp).model_logits(case.name) if in_ranks else case.logits(devs[:tp], comm.name, split_for(tp))
    except UnsupportedError as e:  # the executor refuses ops or dtypes outside the backend's capabilities
        kit.not_supported(str(e))
    worst = 0.0
    try:
        for step, (g, w) in enumerate(zip(got, _reference[case], strict=True)):
            value, problem = compare(g, w, MODEL_NMSE)
            worst = max(worst, value)
            if problem:
                raise AssertionError(f"{case.name} at TP={tp}, step {step}: logits {problem}")
    finally:
        record_property("nmse", worst)
        record_property("threshold", MODEL_NMSE)
