//! The output format: one line per figure, `NAME VALUE UNIT key=value ...`, so a figure can be
//! grepped, diffed between runs and parsed by the smoke test. Informational lines start with `#`.

use std::fmt;
use std::io::Write as _;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    name: &'static str,
    value: f64,
    unit: &'static str,
    params: Vec<(&'static str, String)>,
}

/// Formats a number with about four significant digits and no exponent, so lines stay short
/// and every value parses as an `f64`.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "NaN".to_owned();
    }
    let a = v.abs();
    let decimals = if a >= 1000.0 {
        0
    } else if a >= 100.0 {
        1
    } else if a >= 10.0 {
        2
    } else if a >= 1.0 {
        3
    } else {
        4
    };
    format!("{v:.decimals$}")
}

impl Figure {
    pub fn new(name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            name,
            value,
            unit,
            params: Vec::new(),
        }
    }

    /// Adds a parameter; its value must not contain whitespace.
    pub fn param(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.params
            .push((key, value.to_string().replace(char::is_whitespace, "_")));
        self
    }

    /// Adds a numeric parameter, formatted like the value.
    pub fn num(self, key: &'static str, value: f64) -> Self {
        self.param(key, num(value))
    }

    /// Records the target and whether this run met it. `at_most`: lower is better.
    pub fn target(self, at_most: bool, limit: f64) -> Self {
        let (op, met) = if at_most {
            ("<=", self.value <= limit)
        } else {
            (">=", self.value >= limit)
        };
        self.param("target", format!("{op}{}", num(limit)))
            .param("met", if met { "yes" } else { "NO" })
    }

    /// Records a goal that is not a bound on the value alone (e.g. a rate *and* a share of
    /// the bare baseline): `target` describes it, `met` says whether this run met it.
    pub fn goal(self, target: impl fmt::Display, met: bool) -> Self {
        self.param("target", target)
            .param("met", if met { "yes" } else { "NO" })
    }

    /// Prints the line at once (a long run shows progress) and flushes.
    pub fn emit(&self) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{self}");
        let _ = out.flush();
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.name, num(self.value), self.unit)?;
        for (k, v) in &self.params {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// Prints an informational line (not a figure).
pub fn note(text: impl fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "# {text}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_name_value_unit_then_params() {
        let f = Figure::new("submit.throughput", 5123.456, "exp/s")
            .param("batch", 1000)
            .param("note", "two words")
            .target(false, 5000.0);
        assert_eq!(
            f.to_string(),
            "submit.throughput 5123 exp/s batch=1000 note=two_words target=>=5000 met=yes"
        );
        assert_eq!(num(0.123456), "0.1235");
        assert_eq!(num(12.3456), "12.35");
        assert_eq!(num(f64::NAN), "NaN");
    }
}
