"""A measured profile whose held-out step error is poor says so: a one-line warning from
`dlora profile` (numbers, worst group, what to do) and a note in the profile's provenance."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dlora.profile import load_profile
from dlora.profiling.fit import POOR_FIT_MEAN_REL, note_poor_fit, poor_fit_warning

ROOT = Path(__file__).resolve().parents[2]
BAD = {"step_mean_rel": 1.06, "step_max_rel": 6.17, "step_decode_mean_rel": 0.3,
       "step_unmerged_mean_rel": 2.4, "step_fit_points": 40.0}


def test_good_or_unmeasured_fits_give_no_warning() -> None:
    assert poor_fit_warning({}) is None
    assert poor_fit_warning({"attention_mean_rel": 3.0}) is None  # an imported profile's keys
    assert poor_fit_warning({"step_mean_rel": POOR_FIT_MEAN_REL, "step_max_rel": 2.0}) is None


def test_a_poor_fit_warns_with_its_numbers_and_what_to_do() -> None:
    warning = poor_fit_warning(BAD)
    assert warning is not None and "\n" not in warning
    assert "106% mean / 617% max" in warning and "worst unmerged 240% mean" in warning
    assert "over 25%" in warning and "--repeats" in warning


def test_the_warning_goes_into_the_provenance_once_and_survives_a_round_trip(tmp_path: Path) -> None:
    good = load_profile(ROOT / "profiles" / "cpu-demo-measured.yaml")
    assert note_poor_fit(good) is good
    bad = note_poor_fit(replace(good, fit_error=BAD))
    assert "Fit warning: held-out step fit error 106% mean" in bad.provenance.notes
    assert bad.provenance.notes.startswith(good.provenance.notes)
    assert note_poor_fit(bad) is bad
    path = tmp_path / "bad.yaml"
    path.write_text(bad.dump())
    assert load_profile(path).provenance.notes == bad.provenance.notes
