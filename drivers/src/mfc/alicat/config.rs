//! The `driver = "alicat"` entry of `[[devices]]`: an Alicat mass-flow controller on a serial
//! port. Its keys are [`AlicatSettings`] plus the device's `id`.

use std::sync::Arc;

use super::{AlicatMfc, AlicatSettings};
use crate::device::{Device, Limits};
use crate::registry::{BuildContext, DeviceSpec, DriverFactory, KeyError, PortUse, parse_table};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "alicat"
    }
    fn family(&self) -> &'static str {
        "mfc"
    }
    fn parse(&self, mut table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        let id = match table.remove("id") {
            Some(toml::Value::String(id)) => id,
            Some(_) => {
                return Err(KeyError {
                    path: "id".into(),
                    message: "must be a string".into(),
                });
            }
            None => {
                return Err(KeyError {
                    path: String::new(),
                    message: "missing field `id`".into(),
                });
            }
        };
        let settings: AlicatSettings = parse_table(table)?;
        Ok(Box::new(AlicatEntry { id, settings }))
    }
}

/// One configured controller.
#[derive(Debug, Clone)]
pub struct AlicatEntry {
    pub id: String,
    pub settings: AlicatSettings,
}

impl DeviceSpec for AlicatEntry {
    fn id(&self) -> &str {
        &self.id
    }
    fn driver(&self) -> &'static str {
        Factory.name()
    }
    fn family(&self) -> &'static str {
        Factory.family()
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.settings.port.is_empty() {
            out.push("port: must not be empty".to_owned());
        }
        if let Err(e) = self.settings.clone().into_config(self.id.clone()) {
            out.push(e);
        }
        out
    }

    fn limits(&self) -> Option<&Limits> {
        None
    }

    fn serial_port(&self) -> Option<PortUse<'_>> {
        Some(PortUse {
            key: "port",
            port: &self.settings.port,
        })
    }

    fn build(&self, _ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        let config = self.settings.clone().into_config(self.id.clone())?;
        Ok(Arc::new(AlicatMfc::new(config)))
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}
