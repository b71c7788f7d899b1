//! A `SubmitBatch` request body as a client may send it: protobuf decoding, then the
//! submission checks (structure, finiteness, limits, capabilities) against a small lab of
//! configured, unconnected devices. A refusal is fine; a panic is not.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use ppu_daemon::config::Config;
use ppu_daemon::devices::Devices;
use ppu_daemon::safety::check_batch;
use ppu_proto::v1 as pb;
use prost::Message as _;

const LAB: &str = r#"
[auth]
open = true

[[devices]]
driver = "eurotherm"
id = "furnace-1"
endpoint = "modbus-tcp://127.0.0.1:1"
[devices.limits]
max_temperature_c = 1100.0
max_rate_c_per_min = 20.0

[[devices]]
driver = "mt_sics"
id = "balance-1"
port = "/nonexistent/balance"

[[devices]]
driver = "ne1000"
id = "pump-a"
port = "/nonexistent/pump"
reagent = "A"
density_g_per_ml = 1.0
syringe_inner_diameter_mm = 14.43
syringe_volume_ml = 10.0
fill_ml = 10.0
balance = "balance-1"
[devices.limits]
max_rate_ml_per_min = 20.0
max_volume_ml = 10.0
"#;

static DEVICES: LazyLock<Devices> = LazyLock::new(|| {
    let (config, _) = Config::parse_unchecked(LAB, Path::new("/nonexistent/ppud.toml"))
        .expect("the fuzz lab's config parses");
    Devices::new(config.drivers().expect("the fuzz lab's drivers build"))
});

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::SubmitBatchRequest::decode(data) {
        let _ = check_batch(&req, &DEVICES);
    }
});
