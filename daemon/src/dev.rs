//! `ppud dev`: a simulated lab in the daemon's process. Every simulated device sits behind its
//! real wire protocol on a loopback socket, and the daemon reaches it through the same drivers
//! and config path as in a real lab; only the addresses come from here.

use std::net::SocketAddr;

use ppu_drivers::Clock;
use ppu_drivers::device::Limits;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};

use crate::config::{DeviceConfig, EurothermEntry};

/// A simulated furnace and its Modbus TCP server.
pub struct SimulatedFurnace {
    pub id: String,
    pub sim: SimFurnace,
    pub server: ServerHandle,
}

/// The simulated lab.
pub struct DevLab {
    pub furnaces: Vec<SimulatedFurnace>,
}

/// Limits ppud dev declares for its furnaces: a typical lab box furnace.
pub fn furnace_limits() -> Limits {
    Limits {
        max_temperature_c: Some(1100.0),
        min_temperature_c: Some(0.0),
        max_rate_c_per_min: Some(20.0),
        max_hold_s: Some(48.0 * 3600.0),
        ..Limits::default()
    }
}

impl DevLab {
    /// Starts `furnaces` simulated Eurotherm controllers on loopback ports chosen by the OS.
    pub async fn start(clock: Clock, furnaces: usize) -> std::io::Result<DevLab> {
        let mut out = Vec::with_capacity(furnaces);
        for i in 1..=furnaces {
            let sim = SimFurnace::new(FurnaceConfig::default(), clock);
            let server = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim.clone()).await?;
            out.push(SimulatedFurnace {
                id: format!("furnace-{i}"),
                sim,
                server,
            });
        }
        Ok(DevLab { furnaces: out })
    }

    /// Config entries pointing the real drivers at the simulated devices.
    pub fn device_configs(&self) -> Vec<DeviceConfig> {
        self.furnaces
            .iter()
            .map(|f| {
                let mut e = EurothermEntry::new(
                    f.id.clone(),
                    format!("modbus-tcp://{}", f.server.local_addr()),
                    furnace_limits(),
                );
                e.unit_id = f.sim.unit_id();
                DeviceConfig::Eurotherm(e)
            })
            .collect()
    }

    /// Stops every simulated device's server.
    pub async fn shutdown(self) {
        for f in self.furnaces {
            f.server.shutdown().await;
        }
    }
}
