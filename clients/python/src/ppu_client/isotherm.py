"""Isotherm results out of the daemon and into the adsorption community's formats: the
Adsorption Information File (AIF, a CIF dialect; Evans et al., Langmuir 2021) and pyGAPS.

Every function takes either an `IsothermResult` message or an `ExperimentResult` (whose last
isotherm is used, with its sample id, name and finish time as metadata).
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import TYPE_CHECKING, Any, Union

from . import pb
from .models import ExperimentResult

if TYPE_CHECKING:  # pragma: no cover
    import pygaps

IsothermLike = Union[pb.IsothermResult, ExperimentResult]

_KELVIN = 273.15
#: The AIF dictionary version written (the one pyGAPS 4.6 and `ppuctl export` use).
AIF_VERSION = "d546195"


def _resolve(
    iso: IsothermLike,
) -> tuple[pb.IsothermResult, str, str, _dt.datetime | None]:
    """(isotherm, sample id, name, finish time) from either input kind."""
    if isinstance(iso, pb.IsothermResult):
        return iso, "", "", None
    if isinstance(iso, ExperimentResult):
        for r in reversed(iso.steps):
            if r.WhichOneof("result") == "isotherm":
                finished = None
                if r.finished_at.seconds or r.finished_at.nanos:
                    finished = r.finished_at.ToDatetime(tzinfo=_dt.timezone.utc)
                return r.isotherm, iso.sample_id, iso.name, finished
        raise ValueError(f"experiment {iso.id} has no isotherm result")
    raise TypeError(f"not an isotherm result: {iso!r}")


def amount_at(
    iso: IsothermLike,
    pressure_bar: float,
    *,
    through_origin: bool = True,
    rel_tol: float = 1e-6,
) -> float:
    """Uptake in mmol/g at `pressure_bar`, linearly interpolated between the measured points
    of the adsorption branch.

    With `through_origin` (the default) the isotherm is anchored at (0 bar, 0 mmol/g), as every
    adsorption isotherm is, so a pressure below the first measured point interpolates towards
    zero. Raises ValueError above the highest point (no extrapolation) or with no points.
    """
    result, *_ = _resolve(iso)
    pts = sorted((p.pressure_bar, p.amount_mmol_per_g) for p in result.points)
    if not pts:
        raise ValueError("the isotherm has no points")
    tol = rel_tol * max(abs(pressure_bar), 1e-12)
    for p, n in pts:
        if abs(p - pressure_bar) <= tol:
            return n
    if through_origin and pts[0][0] > 0.0:
        pts.insert(0, (0.0, 0.0))
    for (p0, n0), (p1, n1) in zip(pts, pts[1:]):
        if p0 <= pressure_bar <= p1 and p1 > p0:
            return n0 + (n1 - n0) * (pressure_bar - p0) / (p1 - p0)
    raise ValueError(
        f"{pressure_bar} bar is outside the measured range {pts[0][0]}..{pts[-1][0]} bar"
    )


def _cif_value(v: Any) -> str:
    """A CIF value: numbers as they are, text quoted so that any content survives."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(float(v)) if isinstance(v, float) else str(v)
    s = str(v)
    if "\n" in s or ("'" in s and '"' in s):
        return f"\n;{s}\n;"
    if "'" in s:
        return f'"{s}"'
    return f"'{s}'"


def _block_name(*candidates: str) -> str:
    for c in candidates:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", c).strip("_")
        if name:
            return name
    return "ppu_isotherm"


def isotherm_to_aif(
    iso: IsothermLike,
    *,
    material: str | None = None,
    operator: str = "",
    date: _dt.datetime | str | None = None,
) -> str:
    """The isotherm as an AIF document (text), with the same fields as `ppuctl export`.

    Args:
        iso: an `IsothermResult` or an `ExperimentResult` holding one.
        material: `_adsnt_material_id`; defaults to the experiment's sample id, else its name.
        operator: `_exptl_operator`, written when given.
        date: `_exptl_date`; defaults to when the isotherm step finished.

    Units written: temperature K, pressure bar (absolute), mass g, loading mmol/g, degas time
    h. `_adsorp_p0` is 0 where no saturation pressure applies (supercritical CO2 at 25 °C).
    """
    result, exp_sample, exp_name, finished = _resolve(iso)
    if material is None:
        material = exp_sample or exp_name
    when = date if date is not None else finished
    if isinstance(when, _dt.datetime):
        when = when.isoformat()

    pairs: list[tuple[str, Any]] = [
        ("_audit_aif_version", AIF_VERSION),
        ("_audit_creation_method", "ppu-client"),
    ]
    if operator:
        pairs.append(("_exptl_operator", operator))
    if when:
        pairs.append(("_exptl_date", when))
    pairs += [
        ("_exptl_adsorptive", result.adsorptive),
        ("_exptl_temperature", round(result.temperature_c + _KELVIN, 6)),
        ("_exptl_method", "volumetric"),
    ]
    if result.instrument:
        pairs.append(("_exptl_instrument", result.instrument))
    pairs.append(("_adsnt_material_id", material or "unknown"))
    if result.sample_mass_g > 0:
        pairs.append(("_adsnt_sample_mass", float(result.sample_mass_g)))
    if result.degas_temperature_c or result.degas_duration_s:
        pairs.append(("_adsnt_degas_temperature", round(result.degas_temperature_c + _KELVIN, 6)))
        pairs.append(("_adsnt_degas_time", result.degas_duration_s / 3600.0))
    pairs += [
        ("_units_temperature", "K"),
        ("_units_pressure", "bar"),
        ("_units_mass", "g"),
        ("_units_loading", "mmol/g"),
    ]

    lines = [f"data_{_block_name(material)}"]
    width = max(len(k) for k, _ in pairs)
    lines += [f"{k.ljust(width)} {_cif_value(v)}" for k, v in pairs]
    lines += ["", "loop_", "_adsorp_pressure", "_adsorp_p0", "_adsorp_amount"]
    for p in result.points:
        lines.append(
            f"{float(p.pressure_bar)!r} {float(p.p0_bar)!r} {float(p.amount_mmol_per_g)!r}"
        )
    return "\n".join(lines) + "\n"


def isotherm_to_pygaps(iso: IsothermLike, *, material: str | None = None) -> pygaps.PointIsotherm:
    """The isotherm as a `pygaps.PointIsotherm` (absolute pressure in bar, loading in mmol/g,
    temperature in K).

    Needs pyGAPS (``pip install 'ppu-client[pygaps]'``); raises ImportError saying so when it
    is not installed.
    """
    try:
        import pygaps as _pygaps
    except ImportError as e:
        raise ImportError(
            "isotherm_to_pygaps needs pyGAPS; install it with "
            "`pip install 'ppu-client[pygaps]'` (or `pip install pygaps`)"
        ) from e
    result, exp_sample, exp_name, _ = _resolve(iso)
    if not result.points:
        raise ValueError("the isotherm has no points")
    name = material if material is not None else (exp_sample or exp_name or "unknown")
    extra: dict[str, Any] = {}
    if result.instrument:
        extra["instrument"] = result.instrument
    if result.sample_mass_g > 0:
        extra["material_mass"] = float(result.sample_mass_g)
    return _pygaps.PointIsotherm(
        pressure=[p.pressure_bar for p in result.points],
        loading=[p.amount_mmol_per_g for p in result.points],
        material=name,
        adsorbate=result.adsorptive,
        temperature=result.temperature_c + _KELVIN,
        temperature_unit="K",
        pressure_mode="absolute",
        pressure_unit="bar",
        loading_basis="molar",
        loading_unit="mmol",
        material_basis="mass",
        material_unit="g",
        **extra,
    )
