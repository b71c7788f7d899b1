#!/usr/bin/env python3
"""Closed-loop search for a CO2 sorbent against a running `ppud dev`.

Each round submits a batch of candidate syntheses, waits for their isotherms, reads the CO2
uptake at 0.15 bar (the flue-gas partial pressure), fits a Gaussian process to everything
measured so far and proposes the next batch by expected improvement. The first batch is
random; the loop prints its progress and the best candidate found, and ends with one JSON line
(`{"summary": ...}`) for scripts.

A candidate is a recipe of the documented API:

    Dispense(reagent, volume_ml, rate_ml_per_min)   one per reagent: their ratio and total volume
    FurnaceProgram: ramp to the anneal temperature, hold, cool
    Degas(temperature_c, duration_s)                fixed activation
    Isotherm("CO2", 25 °C, pressure_bar=[...])      the measurement

Needs numpy, scikit-learn and ppu-client (`pip install ./clients/python numpy scikit-learn`),
and a daemon with devices for `dispense`, `furnace_program`, `degas` and `isotherm`:

    cargo run --release --bin ppud -- dev --time-scale 2000     # one terminal
    python examples/closed_loop.py --rounds 4 --batch-size 6    # another

Against a fleet of labs (docs/fleet.md) instead of one daemon, each batch goes through the NATS
JetStream work queue and its results come back from the fleet stream; a candidate runs in
whichever lab has the capabilities and the room (needs `pip install './clients/python[fleet]'`):

    python examples/closed_loop.py --fleet nats://127.0.0.1:4222 --nats-user planner

(the password from $PPU_NATS_PASSWORD, or --nats-creds FILE for a .creds file).

Exit codes: 0 done, 1 error, 3 the daemon (or no lab of the fleet) lacks a needed capability
(the message says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
from ppu_client import (
    Capability,
    Client,
    Degas,
    Dispense,
    Experiment,
    ExperimentResult,
    Hold,
    Isotherm,
    PpuError,
    Ramp,
    Refill,
    State,
    StepTo,
    amount_at,
    furnace,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

#: Reagents `ppud dev` configures on its simulated pumps (one syringe each).
DEFAULT_REAGENTS = ("A", "B")
#: Uptake is read here: CO2 partial pressure of a flue gas, bar.
TARGET_PRESSURE_BAR = 0.15
ISOTHERM_PRESSURES_BAR = (0.05, 0.1, 0.15, 0.3, 0.6, 1.0)
NEEDED = (
    Capability.DISPENSE,
    Capability.FURNACE_PROGRAM,
    Capability.DEGAS,
    Capability.ISOTHERM,
)
EXIT_MISSING_CAPABILITY = 3


@dataclass(frozen=True)
class Space:
    """The search space; the optimiser works in the unit cube and maps into it."""

    reagents: tuple[str, ...]
    volume_ml: tuple[float, float] = (1.0, 8.0)
    anneal_c: tuple[float, float] = (200.0, 600.0)
    hold_h: tuple[float, float] = (0.25, 4.0)

    @property
    def dims(self) -> int:
        # One weight per reagent (their shares are the weights normalised), total volume,
        # anneal temperature and hold time.
        return len(self.reagents) + 3

    def decode(self, x: np.ndarray) -> dict:
        k = len(self.reagents)
        weights = 0.1 + 0.9 * x[:k]
        shares = weights / weights.sum()
        lo, hi = self.volume_ml
        volume = lo + (hi - lo) * x[k]
        lo, hi = self.anneal_c
        temp = lo + (hi - lo) * x[k + 1]
        lo, hi = self.hold_h
        hold = lo + (hi - lo) * x[k + 2]
        return {
            "volumes_ml": {
                r: round(float(volume * s), 3) for r, s in zip(self.reagents, shares)
            },
            "anneal_c": round(float(temp), 1),
            "hold_h": round(float(hold), 3),
        }


def recipe(
    params: dict, name: str, sample_id: str, labels: dict[str, str]
) -> Experiment:
    """A candidate's experiment: dispense, anneal, degas, measure."""
    steps: list = []
    for reagent, volume in params["volumes_ml"].items():
        if volume > 0:
            # Fill the syringe first so a long campaign never runs a pump dry.
            steps.append(Refill(reagent))
            steps.append(Dispense(reagent, volume_ml=volume, rate_ml_per_min=5.0))
    steps.append(
        furnace(
            Ramp(params["anneal_c"], 20.0),
            Hold(params["hold_h"] * 3600.0),
            StepTo(80.0),
        )
    )
    steps.append(Degas(200.0, duration_s=3600.0))
    steps.append(Isotherm("CO2", 25.0, pressure_bar=list(ISOTHERM_PRESSURES_BAR)))
    return Experiment(name=name, steps=steps, sample_id=sample_id, labels=labels)


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _norm_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def expected_improvement(
    mu: np.ndarray, sigma: np.ndarray, best: float, xi: float
) -> np.ndarray:
    sigma = np.maximum(sigma, 1e-9)
    z = (mu - best - xi) / sigma
    return (mu - best - xi) * _norm_cdf(z) + sigma * _norm_pdf(z)


def propose(
    X: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator, xi: float = 0.01
) -> np.ndarray:
    """`n` new points by expected improvement, one at a time with the "kriging believer"
    heuristic: each chosen point is added with its predicted value before choosing the next,
    so the batch spreads out instead of piling onto one maximum."""
    y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
    yn = (y - y_mean) / y_std
    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=np.full(X.shape[1], 0.3), length_scale_bounds=(0.03, 3.0), nu=2.5
    ) + WhiteKernel(1e-3, (1e-6, 1e-1))
    gp = GaussianProcessRegressor(
        kernel=kernel,
        normalize_y=False,
        n_restarts_optimizer=3,
        random_state=int(rng.integers(2**31)),
    )
    gp.fit(X, yn)
    Xb, yb = X.copy(), yn.copy()
    chosen = []
    for _ in range(n):
        best_i = int(np.argmax(yb))
        # Candidates: uniform over the cube, plus perturbations of the best points so far.
        broad = rng.random((3000, X.shape[1]))
        top = Xb[np.argsort(yb)[-3:]]
        local = np.clip(
            top[rng.integers(len(top), size=1500)]
            + rng.normal(0, 0.08, (1500, X.shape[1])),
            0,
            1,
        )
        cand = np.vstack([broad, local])
        mu, sigma = gp.predict(cand, return_std=True)
        ei = expected_improvement(mu, sigma, float(yb[best_i]), xi)
        x = cand[int(np.argmax(ei))]
        chosen.append(x)
        # Believe the model at x, refit with the learned kernel (no re-optimisation).
        mu_x = gp.predict(x[None, :])
        Xb, yb = np.vstack([Xb, x]), np.append(yb, mu_x)
        gp = GaussianProcessRegressor(
            kernel=gp.kernel_, optimizer=None, normalize_y=False
        )
        gp.fit(Xb, yb)
    return np.array(chosen)


def uptakes(results: list[tuple[State, str, object]]) -> list[float | None]:
    """The uptake at 0.15 bar per candidate from (state, message, isotherm) (None if failed)."""
    out: list[float | None] = []
    for i, (state, message, iso) in enumerate(results):
        if state is not State.SUCCEEDED or iso is None:
            print(f"    c{i} gave no isotherm ({state.name}: {message})", flush=True)
            out.append(None)
            continue
        try:
            out.append(amount_at(iso, TARGET_PRESSURE_BAR))
        except ValueError as e:
            print(f"    c{i}: {e}", flush=True)
            out.append(None)
    return out


def candidates(
    space: Space, X: np.ndarray, run: str, round_no: int
) -> list[Experiment]:
    return [
        recipe(
            space.decode(x),
            name=f"closed-loop {run} r{round_no} c{i}",
            sample_id=f"CL-{run}-r{round_no}-c{i}",
            labels={"campaign": f"closed-loop-{run}", "round": str(round_no)},
        )
        for i, x in enumerate(X)
    ]


def measure_fleet(
    fleet, space: Space, X: np.ndarray, run: str, round_no: int, timeout_s: float
) -> list[float | None]:
    """Runs one batch on the fleet: one work message per candidate; each result (or refusal)
    comes back from the fleet stream, from whichever lab ran it."""
    ids = fleet.submit_batch(
        candidates(space, X, run, round_no), batch_id=f"cl-{run}-r{round_no}"
    )
    by_id = {}
    for r in fleet.results(ids, timeout=timeout_s):
        by_id[r.msg_id] = r
        where = (
            f"refused by {r.lab}" if r.refused else f"{r.state.name.lower()} in {r.lab}"
        )
        print(f"    c{ids.index(r.msg_id)}: {where}", flush=True)
    return uptakes(
        [
            (State.UNSPECIFIED, by_id[m].reason, None)
            if by_id[m].refused
            else (by_id[m].state, by_id[m].reason, by_id[m].isotherm())
            for m in ids
        ]
    )


def measure(
    client: Client,
    space: Space,
    X: np.ndarray,
    run: str,
    round_no: int,
    timeout_s: float,
) -> list[float | None]:
    """Runs one batch; the uptake at 0.15 bar per candidate (None where it failed)."""
    batch = client.submit_batch(candidates(space, X, run, round_no))
    by_id: dict[str, ExperimentResult] = {}
    for r in client.results(batch, timeout=timeout_s):
        by_id[r.id] = r
        print(f"    {r.name}: {r.state.name.lower()}", flush=True)
    return uptakes(
        [
            (by_id[e].state, by_id[e].message, by_id[e].isotherm())
            for e in batch.experiment_ids
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051", help="ppud gRPC address")
    ap.add_argument(
        "--rounds", type=int, default=4, help="batches in all, the first random"
    )
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reagents",
        default=",".join(DEFAULT_REAGENTS),
        help="comma-separated reagent names as configured on the daemon",
    )
    ap.add_argument(
        "--round-timeout", type=float, default=900.0, help="seconds per batch"
    )
    ap.add_argument(
        "--fleet",
        metavar="NATS_URLS",
        help="run on a fleet of labs through NATS JetStream (comma-separated nats:// URLs) "
        "instead of one daemon at --target",
    )
    ap.add_argument("--nats-user", help="NATS user (password from $PPU_NATS_PASSWORD)")
    ap.add_argument(
        "--nats-creds", help="NATS .creds file (instead of user and password)"
    )
    args = ap.parse_args(argv)
    # Length scales at their bounds are expected with few points; the fit is still usable.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    reagents = tuple(r.strip() for r in args.reagents.split(",") if r.strip())
    space = Space(reagents=reagents)
    rng = np.random.default_rng(args.seed)
    run = uuid.uuid4().hex[:8]

    if args.fleet:
        try:
            from ppu_client.fleet import FleetClient, FleetError
        except ImportError as e:
            print(f"closed_loop: {e}", file=sys.stderr)
            return 1
        servers = [u.strip() for u in args.fleet.split(",") if u.strip()]
        auth: dict = {}
        if args.nats_user:
            auth = {
                "user": args.nats_user,
                "password": os.environ.get("PPU_NATS_PASSWORD", ""),
            }
        if args.nats_creds:
            auth["creds"] = args.nats_creds
        try:
            conn = FleetClient(servers, **auth)
        except FleetError as e:
            print(f"closed_loop: {e}", file=sys.stderr)
            return 1
        where = f"the fleet at {args.fleet}"

        def have_caps() -> set[str]:
            return {c for lab in conn.labs() for c in lab.capabilities}

        def run_round(X: np.ndarray, round_no: int) -> list[float | None]:
            return measure_fleet(conn, space, X, run, round_no, args.round_timeout)

        errors: tuple[type[Exception], ...] = (FleetError, TimeoutError)
    else:
        conn = Client(args.target)
        where = f"the daemon at {args.target}"

        def have_caps() -> set[str]:
            return {c.name.lower() for c in conn.capabilities()}

        def run_round(X: np.ndarray, round_no: int) -> list[float | None]:
            return measure(conn, space, X, run, round_no, args.round_timeout)

        errors = (PpuError,)

    with conn:
        try:
            have = have_caps()
        except errors as e:
            print(f"closed_loop: cannot reach {where}: {e}", file=sys.stderr)
            return 1
        missing = [c.name.lower() for c in NEEDED if c.name.lower() not in have]
        if missing:
            print(
                f"closed_loop: cannot run: {where} has no device with "
                f"capability {', '.join(missing)} (it offers: "
                f"{', '.join(sorted(have)) or 'nothing'})",
                file=sys.stderr,
            )
            return EXIT_MISSING_CAPABILITY

        print(
            f"closed loop {run}: {args.rounds} rounds x {args.batch_size} candidates, "
            f"reagents {', '.join(reagents)}, uptake read at {TARGET_PRESSURE_BAR} bar",
            flush=True,
        )
        X_all: list[np.ndarray] = []
        y_all: list[float] = []
        first_best = None
        started = time.monotonic()
        for round_no in range(args.rounds):
            if round_no == 0 or len(y_all) < 2:
                X = rng.random((args.batch_size, space.dims))
                how = "random"
            else:
                X = propose(np.array(X_all), np.array(y_all), args.batch_size, rng)
                how = "GP expected improvement"
            print(f"round {round_no} ({how}):", flush=True)
            try:
                ys = run_round(X, round_no)
            except errors as e:
                print(f"closed_loop: round {round_no} failed: {e}", file=sys.stderr)
                return 1
            for x, y in zip(X, ys):
                p = space.decode(x)
                shown = "failed" if y is None else f"{y:.3f} mmol/g"
                print(
                    f"  {shown:>14}  anneal {p['anneal_c']:6.1f} C  hold {p['hold_h']:5.2f} h  "
                    + "  ".join(f"{r} {v:.2f} mL" for r, v in p["volumes_ml"].items()),
                    flush=True,
                )
                if y is not None:
                    X_all.append(x)
                    y_all.append(y)
            if round_no == 0:
                measured = [y for y in ys if y is not None]
                if not measured:
                    print(
                        "closed_loop: the random batch produced no measurement",
                        file=sys.stderr,
                    )
                    return 1
                first_best = max(measured)
            best_i = int(np.argmax(y_all))
            print(
                f"  best so far {y_all[best_i]:.3f} mmol/g "
                f"(first random batch {first_best:.3f}), {time.monotonic() - started:.0f} s",
                flush=True,
            )

        best_i = int(np.argmax(y_all))
        best = space.decode(X_all[best_i])
        print(
            f"best candidate: {y_all[best_i]:.3f} mmol/g CO2 at {TARGET_PRESSURE_BAR} bar:"
        )
        print(
            f"  anneal {best['anneal_c']} C for {best['hold_h']} h, volumes {best['volumes_ml']}"
        )
        summary = {
            "run": run,
            "rounds": args.rounds,
            "measured": len(y_all),
            "first_batch_best": first_best,
            "best": y_all[best_i],
            "best_candidate": best,
            "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
