"""The MAF1 stand-in matches the Azure Functions 2019 statistic it is built from, and dLoRA's
stride raises skew monotonically."""

from __future__ import annotations

import pytest

from dlora.studies.maf_standin import maf1_standin_shares, top_fraction_share


def test_standin_matches_the_published_concentration() -> None:
    assert top_fraction_share(0.186) == pytest.approx(0.996, abs=0.005)  # ATC'20: 18.6% -> 99.6%


def test_stride_raises_skew() -> None:
    tops = []
    for stride in (1, 4, 16, 64):
        shares = maf1_standin_shares(16, stride)
        assert len(shares) == 16 and sum(shares) == pytest.approx(1.0) and min(shares) >= 0
        tops.append(max(shares))
    assert tops == sorted(tops) and tops[0] < 0.25 < 0.7 < tops[-1]
    assert maf1_standin_shares(16, 8) == maf1_standin_shares(16, 8)  # deterministic
