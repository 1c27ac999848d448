"""The profile's pure half: eq. 4 fits, the per-length points, the TOML and the plot."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from moe2.selection.profiling import (
    MEASURED,
    ExpertProfile,
    Line,
    ProfileFit,
    StepSample,
    fit_line,
    fit_profile,
    plot_profile,
    profile_toml,
    summarise,
)

LENGTHS = [31, 64, 128, 256, 512, 1024, 2048]
PREFILL = Line(0.0123, 0.00045)
DECODE = Line(0.061, 0.0000021)


def synthetic_samples(power_w: float = 15.0, overhead_s: float = 0.0004) -> list[StepSample]:
    """Three repeats of 1 prefill + 4 decode steps per length, exactly on the lines above."""
    samples = []
    for length in LENGTHS:
        for repeat in range(3):
            for step in range(5):
                compute = (PREFILL if step == 0 else DECODE).at(length)
                wall = compute + overhead_s
                session = f"{length}-{repeat}"
                samples.append(StepSample(session, length, step, compute, power_w * compute, wall))
    return samples


def test_a_line_is_recovered_exactly() -> None:
    fitted = fit_line(LENGTHS, [PREFILL.at(x) for x in LENGTHS])
    assert fitted.base == pytest.approx(PREFILL.base, rel=1e-9)
    assert fitted.slope == pytest.approx(PREFILL.slope, rel=1e-9)


def test_a_negative_coefficient_is_clipped_to_the_best_non_negative_line() -> None:
    falling = fit_line([1, 2, 3], [0.3, 0.2, 0.1])
    assert falling == Line(pytest.approx(0.2), 0.0)
    through_origin = fit_line([1, 2, 3], [0.0, 1.0, 2.0])  # OLS: -1 + x
    assert through_origin.base == 0.0
    assert through_origin.slope == pytest.approx((0 * 1 + 1 * 2 + 2 * 3) / (1 + 4 + 9))


def test_a_line_needs_two_distinct_lengths() -> None:
    with pytest.raises(ValueError, match="two or more distinct x"):
        fit_line([64, 64], [0.1, 0.2])


def test_the_profile_fit_recovers_eq_4_power_and_transmission() -> None:
    fit, points = fit_profile(synthetic_samples(power_w=12.5, overhead_s=0.0004))
    assert [p.prompt_tokens for p in points] == LENGTHS
    for got, want in ((fit.prefill, PREFILL), (fit.decode, DECODE)):
        assert got.base == pytest.approx(want.base, rel=1e-6)
        assert got.slope == pytest.approx(want.slope, rel=1e-6)
    assert fit.power_w == pytest.approx(12.5)
    assert fit.transmission_s == pytest.approx(0.0004)


def test_points_take_the_median_session_of_prefill_and_mean_decode_step() -> None:
    samples = [
        StepSample("a", 40, 0, 0.10, 1.0, 0.2),
        StepSample("a", 40, 1, 0.05, 0.5, 0.06),
        StepSample("a", 40, 2, 0.07, 0.7, 0.08),  # session a decodes at 0.06 s a token
        StepSample("b", 40, 0, 0.50, 5.0, 0.6),  # session b was disturbed throughout
        StepSample("b", 40, 1, 0.30, 3.0, 0.31),
        StepSample("c", 40, 0, 0.12, 1.2, 0.2),
        StepSample("c", 40, 1, 0.04, 0.4, 0.05),
    ]
    (point,) = summarise(samples)
    assert (point.prompt_tokens, point.prefill_s, point.prefill_j) == (40, 0.12, 1.2)
    assert point.decode_s == pytest.approx(0.06) and point.decode_j == pytest.approx(0.6)


def a_profile(expert: str = "jetson-1") -> ExpertProfile:
    fit, points = fit_profile(synthetic_samples())
    return ExpertProfile(
        expert=expert,
        model='SmolLM2-135M-Instruct+ctx:stem@1a2b3c4d "q4"',
        backend="transformers",
        device="orin",
        energy_source="rapl",
        host="box",
        measured_at="2026-01-02T03:04:05Z",
        fit=fit,
        points=tuple(points),
    )


def test_the_toml_reads_back_as_written() -> None:
    profile = a_profile()
    text = profile_toml(profile)
    assert text.startswith(
        "# measured by `moe2 profile` on box at 2026-01-02T03:04:05Z; energy source: rapl\n"
    )
    expert = tomllib.loads(text)["experts"]["jetson-1"]
    assert expert["model"] == profile.model
    assert (expert["backend"], expert["device"], expert["energy_source"]) == (
        "transformers",
        "orin",
        "rapl",
    )
    fit = expert["fit"]
    assert fit["prefill_base_s"] == pytest.approx(PREFILL.base, rel=1e-5)
    assert fit["prefill_per_token_s"] == pytest.approx(PREFILL.slope, rel=1e-5)
    assert fit["decode_base_s"] == pytest.approx(DECODE.base, rel=1e-5)
    assert fit["decode_per_context_token_s"] == pytest.approx(DECODE.slope, rel=1e-5)
    assert (fit["power_w"], fit["transmission_s"]) == (15.0, 0.0004)
    measured = expert["measured"]
    assert measured["prompt_tokens"] == LENGTHS
    for name in ("prefill_s", "prefill_j", "decode_s", "decode_j"):
        want = [getattr(p, name) for p in profile.points]
        assert measured[name] == pytest.approx(want, rel=1e-5)
        assert all(isinstance(v, float) for v in measured[name])


def test_a_non_finite_figure_is_not_written() -> None:
    broken = dataclasses.replace(a_profile(), fit=ProfileFit(PREFILL, DECODE, float("nan"), 0.0))
    with pytest.raises(ValueError, match="must be finite"):
        profile_toml(broken)


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "profile.png"
    plot_profile(a_profile(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000


def test_the_committed_measured_profile_has_the_shape_written_here() -> None:
    path = Path(__file__).parents[1] / "deploy/profiles/measured/smollm2-cpu-2core.toml"
    expert = tomllib.loads(path.read_text())["experts"]["smollm2-cpu"]
    assert set(expert) == {"model", "backend", "device", "energy_source", "fit", "measured"}
    assert set(expert["fit"]) == {
        "prefill_base_s",
        "prefill_per_token_s",
        "decode_base_s",
        "decode_per_context_token_s",
        "power_w",
        "transmission_s",
    }
    measured = expert["measured"]
    assert set(measured) == {"prompt_tokens", *MEASURED}
    assert len({len(values) for values in measured.values()}) == 1
