"""Runs the conformance battery (conformance.py) on every case of tests/adapters/cases/*.py."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from tokentune.errors import TokentuneError

from . import cases as cases_pkg
from .conformance import build_adapter, logits, make_model, perturb, train_and_reload, trainable_in_groups


def _table():
    rows = []
    for info in sorted(pkgutil.iter_modules(cases_pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{cases_pkg.__name__}.{info.name}")
        rows.extend(module.CASES)
    return rows


CASES = _table()
UNIT = [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES for f in c.families]
E2E = [pytest.param(c, f, id=f"{c.id}-{f}") for c in CASES if c.e2e for f in c.families if f != "bert"]


@pytest.mark.parametrize("case,family", UNIT)
def test_attach_leaves_base_untouched_and_counts_trainables(case, family):
    model = make_model(family)
    base_logits = logits(model, family)
    before = {id(p): (p, p.detach().clone()) for p in model.parameters()}
    expected = case.expected_trainable(model) if case.expected_trainable is not None else None  # on the bare model
    adapter = build_adapter(case, model)
    if not case.changes_base:
        changed = [id_ for id_, (p, v) in before.items() if not torch.equal(p.detach(), v)]
        assert not changed, f"{len(changed)} base tensors changed at attach"
    if case.identity_at_init:
        torch.testing.assert_close(logits(model, family), base_logits, atol=case.atol, rtol=0)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    grouped = trainable_in_groups(adapter)
    assert set(trainable) <= set(grouped), "a parameter requires grad but is in no param group"
    assert all(p.requires_grad for p in grouped.values()), "a param group holds a frozen parameter"
    assert set(grouped) <= {id(p) for p in model.parameters()}, "trainable tensors must live in the model (DDP, .to)"
    if expected is not None:
        assert sum(p.numel() for p in trainable.values()) == expected


@pytest.mark.parametrize("case,family", UNIT)
def test_state_round_trip(case, family):
    model = make_model(family)
    adapter = build_adapter(case, model)
    perturb(adapter)
    expected = logits(model, family)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    fresh = make_model(family)
    other = build_adapter(case, fresh)
    other.load_state_dict(state)
    torch.testing.assert_close(logits(fresh, family), expected, atol=case.atol, rtol=0)


@pytest.mark.parametrize("case,family", UNIT)
def test_merge_equals_unmerged_or_refuses(case, family):
    model = make_model(family)
    adapter = build_adapter(case, model)
    perturb(adapter)
    if not case.mergeable:
        with pytest.raises(TokentuneError):
            adapter.merge()
        return
    expected = logits(model, family)
    adapter.merge()
    torch.testing.assert_close(logits(model, family), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case,family", E2E)
def test_train_with_packing_and_accumulation_then_reload_in_fresh_process(case, family, tmp_path):
    here, reloaded = train_and_reload(case, family, tmp_path)
    assert torch.isfinite(here).all()
    torch.testing.assert_close(reloaded, here, atol=1e-5, rtol=1e-5)
