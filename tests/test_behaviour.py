"""The behaviour versions that results records are identified by (cdsr.behaviour): every model,
every preset and the pipeline still compute the numbers fingerprinted in behaviour.json. A change
that moves them must bump the version it names, which marks older records stale."""

from __future__ import annotations

import pytest
import yaml

from cdsr import behaviour
from cdsr.models.registry import MODELS

from conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STORED = behaviour.load()
HOW = ("if the math changed, bump its version in src/cdsr/behaviour.json (records of the old version become stale); "
       "then, or if only a default setting changed (records keep their full configurations), run "
       "`python -m cdsr.behaviour --write`")


def test_every_model_and_preset_has_a_version_and_a_fingerprint():
    assert set(STORED["models"]) == set(MODELS)
    assert set(STORED["fingerprints"]) == set(behaviour.configurations(PARAMS))
    assert behaviour.versions("abxi") == {"pipeline": STORED["pipeline"]["version"],
                                          "model": STORED["models"]["abxi"]["version"]}
    with pytest.raises(KeyError, match="no behaviour version"):
        behaviour.versions("gpt")


@pytest.mark.parametrize("key", sorted(behaviour.configurations(PARAMS)))
def test_models_compute_their_fingerprinted_numbers(key):
    model, section = behaviour.configurations(PARAMS)[key]
    got = behaviour.fingerprint(model, section)
    want = STORED["fingerprints"][key]
    for part in ("losses", "scores"):
        assert behaviour.close(got[part], want[part]), (
            f"{key}: the {part} of model {model!r} changed ({got[part][:4]}... vs {want[part][:4]}...): if intended, {HOW}")


def test_the_pipeline_computes_its_fingerprinted_numbers(tmp_path):
    got = behaviour.pipeline_fingerprint(tmp_path)
    want = STORED["pipeline"]["fingerprint"]
    for part in want:
        assert behaviour.close(got[part], want[part]), (
            f"the training loop / loaders / evaluation changed their numbers ({part}): if intended, {HOW} "
            "(the pipeline's version)")


def test_the_fingerprint_sees_a_change_of_the_math():
    model, section = behaviour.configurations(PARAMS)["abxi"]
    base = behaviour.fingerprint(model, section)
    for change in ({"pad_sink": True}, {"init": "abxi"}, {"temperature": 0.7}):
        assert not behaviour.close(behaviour.fingerprint(model, {**section, **change})["losses"], base["losses"]), change
