//! The hidden synthesis → material map: what a synthesised sample turns out to be.
//!
//! A planner optimises against this function without seeing it, so only its *inputs* are
//! documented (docs/simulator.md): the reagents dispensed into the sample and their amounts,
//! the furnace program it went through (as a temperature trace) and its degas temperature. The
//! map is smooth in every input, fixed by the world's seed (the optimum moves with the seed),
//! has one optimum, and adds a small sample-to-sample variation seeded by the sample id on top
//! of the analyser's own measurement noise.
//!
//! The result is a dual-site Langmuir CO₂ isotherm between a poor, weakly binding solid and a
//! Mg-MOF-74-like framework at the optimum.

use super::physics::{IsothermModel, Material, Noise, Site};
use crate::world::SampleHistory;

/// Stable 64-bit FNV-1a of a string mixed with the seed: the same name always maps to the same
/// hidden parameters for one seed.
fn hash(seed: u64, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Uniform in [0, 1) from a seed and a label.
fn unit(seed: u64, label: &str) -> f64 {
    Noise::new(hash(seed, label)).unit()
}

/// The hidden optimum and scales for one seed.
#[derive(Debug, Clone, Copy)]
struct Hidden {
    /// Best peak calcination temperature, °C.
    t_opt_c: f64,
    /// Width of the temperature optimum, °C.
    t_width_c: f64,
    /// Dwell at the peak that reaches ~63 % of the benefit, s.
    dwell_tau_s: f64,
    /// Best total dispensed volume, mL.
    volume_opt_ml: f64,
    /// Degas temperature that activates half the pores, °C.
    activation_c: f64,
}

fn hidden(seed: u64) -> Hidden {
    Hidden {
        t_opt_c: 250.0 + 200.0 * unit(seed, "t_opt"),
        t_width_c: 90.0 + 60.0 * unit(seed, "t_width"),
        dwell_tau_s: 1200.0 + 2400.0 * unit(seed, "dwell"),
        volume_opt_ml: 2.0 + 6.0 * unit(seed, "volume"),
        activation_c: 100.0 + 80.0 * unit(seed, "activation"),
    }
}

/// Ideal share weight of a reagent (before normalising over the reagents used).
fn ideal_weight(seed: u64, reagent: &str) -> f64 {
    0.25 + 0.75 * unit(seed, &format!("share:{reagent}"))
}

/// How strongly a reagent favours strong (open-metal-like) sites, in [−1, 1].
fn site_character(seed: u64, reagent: &str) -> f64 {
    2.0 * unit(seed, &format!("site:{reagent}")) - 1.0
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Quality in (0, 1] and strong-site fraction in (0, 1) of a synthesis history.
fn quality(seed: u64, h: &SampleHistory) -> (f64, f64) {
    let hid = hidden(seed);
    let total: f64 = h.dispensed_ml.values().sum();
    // Composition: shares against the hidden ideal shares of the reagents used.
    let (s_comp, character) = if total > 0.0 {
        let weights: Vec<(f64, f64)> = h
            .dispensed_ml
            .iter()
            .map(|(name, v)| (v / total, ideal_weight(seed, name)))
            .collect();
        let wsum: f64 = weights.iter().map(|(_, w)| w).sum();
        let mismatch: f64 = weights.iter().map(|(x, w)| (x - w / wsum).powi(2)).sum();
        let character: f64 = h
            .dispensed_ml
            .iter()
            .map(|(name, v)| v / total * site_character(seed, name))
            .sum();
        ((-mismatch / 0.03).exp(), character)
    } else {
        (0.35, 0.0)
    };
    let s_volume = if total > 0.0 {
        let l = (total / hid.volume_opt_ml).ln();
        0.7 + 0.3 * (-l * l / (2.0 * 0.6 * 0.6)).exp()
    } else {
        0.7
    };
    // Thermal treatment: peak temperature and dwell near it.
    let peak = h.peak_c().unwrap_or(25.0);
    let s_temp = (-((peak - hid.t_opt_c) / hid.t_width_c).powi(2)).exp();
    let dwell = h.time_above_s(peak - 25.0);
    let s_dwell = 0.2 + 0.8 * (1.0 - (-dwell / hid.dwell_tau_s).exp());
    // Activation: a degas too cool leaves solvent in the pores.
    let degas_c = h.degas.map_or(25.0, |(t, _)| t);
    let s_active = sigmoid((degas_c - hid.activation_c) / 20.0);
    let q = 0.1 + 0.9 * s_comp * s_volume * s_temp * s_dwell;
    let q = (q * (0.15 + 0.85 * s_active)).clamp(0.01, 1.0);
    let strong = sigmoid(3.0 * character + 1.5 * (s_temp - 0.5));
    (q, strong)
}

/// The material a synthesis history produces (see the module docs for what it depends on).
pub fn synthesised(seed: u64, sample_id: &str, h: &SampleHistory) -> Material {
    let (q, strong) = quality(seed, h);
    // Sample-to-sample variation: the same recipe never gives quite the same powder.
    let variation = (0.03 * Noise::new(hash(seed, &format!("sample:{sample_id}"))).gauss()).exp();
    let co2 = IsothermModel::DualSiteLangmuir(
        Site {
            q_max: 6.0 * q * strong * variation,
            b0_per_bar: 1.75e-6,
            e_j_per_mol: 42_000.0,
        },
        Site {
            q_max: 8.0 * q * variation,
            b0_per_bar: 1.87e-5,
            e_j_per_mol: 24_000.0,
        },
    );
    Material {
        name: format!("synthesised ({sample_id})"),
        co2,
        ldf_k_per_s: 0.01 + 0.03 * (1.0 - strong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(seed: u64, a_ml: f64, b_ml: f64, peak_c: f64, dwell_s: f64) -> SampleHistory {
        let _ = seed;
        let mut h = SampleHistory::default();
        h.dispensed_ml.insert("metal".into(), a_ml);
        h.dispensed_ml.insert("linker".into(), b_ml);
        h.thermal = vec![
            (0.0, 25.0),
            (1000.0, peak_c),
            (1000.0 + dwell_s, peak_c),
            (1e5, 30.0),
        ];
        h.degas = Some((250.0, 6.0 * 3600.0));
        h
    }

    fn uptake(seed: u64, h: &SampleHistory) -> f64 {
        synthesised(seed, "S", h).co2.uptake(0.15, 298.15)
    }

    /// The ideal recipe for a seed, found from the hidden parameters.
    fn optimum(seed: u64) -> SampleHistory {
        let hid = hidden(seed);
        let (wa, wb) = (ideal_weight(seed, "metal"), ideal_weight(seed, "linker"));
        let v = hid.volume_opt_ml;
        recipe(
            seed,
            v * wa / (wa + wb),
            v * wb / (wa + wb),
            hid.t_opt_c,
            6.0 * hid.dwell_tau_s,
        )
    }

    #[test]
    fn the_map_has_an_optimum_and_is_smooth() {
        let seed = 42;
        let best = optimum(seed);
        let q_best = uptake(seed, &best);
        let hid = hidden(seed);
        let (a, b) = (best.dispensed_ml["metal"], best.dispensed_ml["linker"]);
        for worse in [
            recipe(seed, a * 1.5, b, hid.t_opt_c, 6.0 * hid.dwell_tau_s),
            recipe(seed, a, b, hid.t_opt_c + 150.0, 6.0 * hid.dwell_tau_s),
            recipe(seed, a, b, hid.t_opt_c - 150.0, 6.0 * hid.dwell_tau_s),
            recipe(seed, a, b, hid.t_opt_c, 60.0),
        ] {
            assert!(uptake(seed, &worse) < q_best * 0.95, "optimum beaten");
        }
        // Smooth: a 1 °C change moves the uptake by a tiny amount.
        let nudged = recipe(seed, a, b, hid.t_opt_c + 1.0, 6.0 * hid.dwell_tau_s);
        assert!(((uptake(seed, &nudged) - q_best) / q_best).abs() < 0.01);
    }

    #[test]
    fn the_map_is_seeded() {
        let h = recipe(0, 1.0, 2.0, 350.0, 3600.0);
        assert_eq!(uptake(5, &h), uptake(5, &h));
        assert_ne!(uptake(5, &h), uptake(6, &h));
        assert_ne!(hidden(5).t_opt_c, hidden(6).t_opt_c);
    }

    #[test]
    fn an_undegassed_sample_adsorbs_little() {
        let seed = 3;
        let mut h = optimum(seed);
        let activated = uptake(seed, &h);
        h.degas = None;
        assert!(uptake(seed, &h) < 0.5 * activated);
    }
}
