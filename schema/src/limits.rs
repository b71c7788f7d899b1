//! The limits a device declares, by name, as the schema's bounds refer to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Limits a driver declares: numeric bounds by name (`max_temperature_c = 400`) and, for text
/// parameters, the values the device accepts (`accepted.adsorptive = ["CO2", "N2"]`). A
/// family's schema ties its fields to these names (`max_limit: "max_temperature_c"`); a name
/// the device does not declare bounds nothing. Configured as `[devices.limits]` in ppud.toml.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Numeric limits by name; the unit is the name's suffix.
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
    /// Accepted values of text parameters, by parameter name, compared without regard to
    /// ASCII case. A parameter not named here takes any value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accepted: BTreeMap<String, Vec<String>>,
}

impl Limits {
    /// The limit `name`, if declared.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Declares the limit `name`.
    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.values.insert(name.to_owned(), value);
        self
    }

    /// Declares the accepted values of the text parameter `name`.
    pub fn accepting<S: Into<String>>(
        mut self,
        name: &str,
        values: impl IntoIterator<Item = S>,
    ) -> Self {
        self.accepted.insert(
            name.to_owned(),
            values.into_iter().map(Into::into).collect(),
        );
        self
    }

    /// Sets or clears the limit `name`.
    pub fn set(&mut self, name: &str, value: Option<f64>) {
        match value {
            Some(v) => {
                self.values.insert(name.to_owned(), v);
            }
            None => {
                self.values.remove(name);
            }
        }
    }

    /// True if `value` is among the accepted values of `parameter`, or none are declared.
    pub fn accepts(&self, parameter: &str, value: &str) -> bool {
        match self.accepted.get(parameter) {
            None => true,
            Some(list) => list
                .iter()
                .any(|a| a.trim().eq_ignore_ascii_case(value.trim())),
        }
    }
}
