#!/usr/bin/env python3
"""AIF round trip: ppud dev measures an isotherm, ppuctl exports it, pyGAPS reads it back.

Starts `ppud dev` (simulated furnace and analyser) on a free loopback port with a fresh data
directory, submits tests/python/isotherm_batch.toml, waits for the experiment to succeed,
exports its isotherm as AIF and as JSON, parses the AIF with pyGAPS and checks that it recovers
the same points and metadata. Exits non-zero on any mismatch.

Usage: check_aif.py PPUD PPUCTL   (paths of the built binaries)
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE_S = 180


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    ppud, ppuctl = sys.argv[1], sys.argv[2]
    import pygaps.parsing as pgp  # imported late: a missing pyGAPS fails with a clear error

    with tempfile.TemporaryDirectory() as tmp:
        daemon = subprocess.Popen(
            [ppud, "dev", "--listen", "127.0.0.1:0", "--sila-listen", "127.0.0.1:0", "--data-dir", os.path.join(tmp, "data"),
             "--time-scale", "5000", "--furnaces", "1", "--analysers", "1"],
            stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "ppud.log"), "w"), text=True,
        )
        try:
            addr = None
            start = time.monotonic()
            for line in daemon.stdout:
                if line.startswith("listening on "):
                    addr = "http://" + line.split()[-1]
                    break
                if time.monotonic() - start > DEADLINE_S:
                    break
            if addr is None:
                raise SystemExit("ppud dev did not report its address")
            base = [ppuctl, "--addr", addr]
            out = run(base + ["--json", "submit", os.path.join(HERE, "isotherm_batch.toml")])
            exp_id = json.loads(out.stdout)["batch"]["experiment_ids"][0]
            state = None
            while time.monotonic() - start < DEADLINE_S:
                shown = json.loads(run(base + ["--json", "show", exp_id]).stdout)
                state = shown.get("state")
                if state in ("EXPERIMENT_STATE_SUCCEEDED", "EXPERIMENT_STATE_FAILED",
                             "EXPERIMENT_STATE_CANCELLED", "EXPERIMENT_STATE_INTERRUPTED"):
                    break
                time.sleep(0.5)
            if state != "EXPERIMENT_STATE_SUCCEEDED":
                raise SystemExit(f"experiment {exp_id} ended {state}: {shown.get('message')}")
            aif_path = os.path.join(tmp, "isotherm.aif")
            json_path = os.path.join(tmp, "isotherm.json")
            run(base + ["export", exp_id, "--format", "aif", "-o", aif_path])
            run(base + ["export", exp_id, "--format", "json", "-o", json_path])
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()

        with open(json_path) as f:
            expected = json.load(f)
        iso = pgp.isotherm_from_aif(aif_path)
        failures = []

        def check(what, ok):
            if not ok:
                failures.append(what)

        # pyGAPS resolves "CO2" to its adsorbate database entry, "carbon dioxide".
        check(f"adsorbate {iso.adsorbate}", str(iso.adsorbate).lower() in ("co2", "carbon dioxide"))
        check(f"temperature {iso.temperature}", math.isclose(iso.temperature, 298.15, rel_tol=1e-9))
        check(f"material {iso.material}", str(iso.material) == "S-aif-1")
        check(f"pressure unit {iso.pressure_unit}", iso.pressure_unit == "bar")
        check(f"loading unit {iso.loading_unit}/{iso.material_unit}",
              iso.loading_unit == "mmol" and iso.material_unit == "g")
        pressure = list(iso.pressure())
        loading = list(iso.loading())
        points = expected["points"]
        check(f"{len(pressure)} points for {len(points)}", len(pressure) == len(points) == 10)
        for k, (p, q, e) in enumerate(zip(pressure, loading, points)):
            check(f"point {k} pressure {p} vs {e['pressure_bar']}",
                  math.isclose(p, e["pressure_bar"], rel_tol=1e-9))
            check(f"point {k} amount {q} vs {e['amount_mmol_per_g']}",
                  math.isclose(q, e["amount_mmol_per_g"], rel_tol=1e-9))
        for f in failures:
            print(f"FAIL: {f}")
        print(f"check_aif: {len(points)} points recovered by pyGAPS from {exp_id}"
              if not failures else "check_aif: mismatches found")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
