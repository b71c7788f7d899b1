"""Recipes as plain dataclasses: experiments and the steps they run, converted to ppu.v1
messages by `to_proto()`.

Units are in the field names, as in the API: `_c` °C, `_c_per_min` °C/min, `_s` seconds of
*physical* time (the daemon's scaled clock), `_ml` mL, `_ml_per_min` mL/min, `_bar` bar
absolute, `_g` grams. Values are checked by the daemon against the devices' limits when the
batch is submitted; a refusal raises `InvalidArgumentError` naming the field.

Example::

    exp = Experiment(
        name="MgAl-LDO 450 C",
        sample_id="S-002",
        steps=[
            Dispense("mg_nitrate", volume_ml=2.0, rate_ml_per_min=1.0),
            anneal(450.0, hold_s=3600.0),
            Degas(150.0, duration_s=7200.0),
            Isotherm("CO2", 25.0, pressure_bar=[0.05, 0.15, 0.5, 1.0]),
        ],
    )
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from . import pb


@dataclass(frozen=True)
class Ramp:
    """Ramp the setpoint to `temperature_c` at `rate_c_per_min`; ends when the furnace is there."""

    temperature_c: float
    rate_c_per_min: float

    def to_proto(self) -> pb.FurnaceSegment:
        return pb.FurnaceSegment(
            ramp=pb.Ramp(temperature_c=self.temperature_c, rate_c_per_min=self.rate_c_per_min)
        )


@dataclass(frozen=True)
class Hold:
    """Hold the current setpoint for `duration_s` seconds of physical time."""

    duration_s: float

    def to_proto(self) -> pb.FurnaceSegment:
        return pb.FurnaceSegment(hold=pb.Hold(duration_s=self.duration_s))


@dataclass(frozen=True)
class StepTo:
    """Jump the setpoint to `temperature_c` (no rate limit) and wait until it is reached."""

    temperature_c: float

    def to_proto(self) -> pb.FurnaceSegment:
        return pb.FurnaceSegment(step=pb.StepTo(temperature_c=self.temperature_c))


Segment = Union[Ramp, Hold, StepTo]


@dataclass(frozen=True)
class Furnace:
    """A furnace temperature program (capability FURNACE_PROGRAM). The furnace goes to its safe
    state when the program ends or is aborted."""

    segments: Sequence[Segment]
    #: Pin to this device; empty lets the scheduler choose.
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            furnace=pb.FurnaceProgram(segments=[s.to_proto() for s in self.segments]),
        )


@dataclass(frozen=True)
class Dispense:
    """Dispense `volume_ml` of a reagent configured on the daemon (capability DISPENSE)."""

    reagent: str
    volume_ml: float
    rate_ml_per_min: float
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            dispense=pb.Dispense(
                reagent=self.reagent,
                volume_ml=self.volume_ml,
                rate_ml_per_min=self.rate_ml_per_min,
            ),
        )


@dataclass(frozen=True)
class Weigh:
    """Read a stable weight (capability WEIGH); 0 s means the device's default timeout."""

    stability_timeout_s: float = 0.0
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            weigh=pb.Weigh(stability_timeout_s=self.stability_timeout_s),
        )


@dataclass(frozen=True)
class Degas:
    """Degas the sample under vacuum before an isotherm (capability DEGAS)."""

    temperature_c: float
    duration_s: float
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            degas=pb.Degas(temperature_c=self.temperature_c, duration_s=self.duration_s),
        )


@dataclass(frozen=True)
class Isotherm:
    """Measure an adsorption isotherm (capability ISOTHERM) at the given pressures (bar abs,
    strictly increasing). Zero for the optional fields means the device default."""

    adsorptive: str
    temperature_c: float
    pressure_bar: Sequence[float]
    equilibration_interval_s: float = 0.0
    max_equilibration_s: float = 0.0
    sample_mass_g: float = 0.0
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            isotherm=pb.Isotherm(
                adsorptive=self.adsorptive,
                temperature_c=self.temperature_c,
                pressure_bar=list(self.pressure_bar),
                equilibration_interval_s=self.equilibration_interval_s,
                max_equilibration_s=self.max_equilibration_s,
                sample_mass_g=self.sample_mass_g,
            ),
        )


@dataclass(frozen=True)
class Refill:
    """Refill the reagent's pump syringe from its reservoir (capability DISPENSE); 0 mL fills
    the syringe, 0 mL/min uses the pump's default rate."""

    reagent: str
    volume_ml: float = 0.0
    rate_ml_per_min: float = 0.0
    device_id: str = ""

    def to_proto(self) -> pb.Step:
        return pb.Step(
            device_id=self.device_id,
            refill=pb.Refill(
                reagent=self.reagent,
                volume_ml=self.volume_ml,
                rate_ml_per_min=self.rate_ml_per_min,
            ),
        )


StepLike = Union[Furnace, Dispense, Weigh, Degas, Isotherm, Refill, pb.Step]


def furnace(*segments: Segment, device_id: str = "") -> Furnace:
    """A furnace program from its segments: ``furnace(Ramp(450, 10), Hold(3600), StepTo(50))``."""
    return Furnace(segments=tuple(segments), device_id=device_id)


def anneal(
    temperature_c: float,
    hold_s: float,
    *,
    rate_c_per_min: float = 10.0,
    cool_to_c: float = 50.0,
    device_id: str = "",
) -> Furnace:
    """Ramp to `temperature_c`, hold `hold_s` seconds, then step down to `cool_to_c`."""
    return furnace(
        Ramp(temperature_c, rate_c_per_min),
        Hold(hold_s),
        StepTo(cool_to_c),
        device_id=device_id,
    )


def step_to_proto(step: StepLike) -> pb.Step:
    """A step as its ppu.v1 message (messages pass through unchanged)."""
    if isinstance(step, pb.Step):
        return step
    to_proto = getattr(step, "to_proto", None)
    if to_proto is None:
        raise TypeError(f"not a step: {step!r}")
    return to_proto()


@dataclass
class Experiment:
    """One experiment of a batch: a named sequence of steps on one sample."""

    name: str
    steps: Sequence[StepLike]
    #: The physical sample this experiment makes or measures.
    sample_id: str = ""
    #: Free-form labels, filterable with `Client.list(labels=...)`.
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Higher runs first; equal priorities run in submission order.
    priority: int = 0

    def to_proto(self) -> pb.ExperimentSpec:
        return pb.ExperimentSpec(
            name=self.name,
            sample_id=self.sample_id,
            labels=dict(self.labels),
            priority=self.priority,
            steps=[step_to_proto(s) for s in self.steps],
        )


ExperimentLike = Union[Experiment, pb.ExperimentSpec]


def experiment_to_proto(exp: ExperimentLike) -> pb.ExperimentSpec:
    """An experiment as its ppu.v1 message (messages pass through unchanged)."""
    if isinstance(exp, pb.ExperimentSpec):
        return exp
    if isinstance(exp, Experiment):
        return exp.to_proto()
    raise TypeError(f"not an experiment: {exp!r}")
