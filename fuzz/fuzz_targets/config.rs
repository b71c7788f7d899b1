//! `ppud` configuration files: parsing and validation (everything `ppud check-config` checks
//! without touching the network). Nothing may panic, whatever the file holds.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ppu_daemon::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/ppud-fuzz/ppud.toml");
    if let Ok((config, policies)) = Config::parse_unchecked(text, path) {
        let _ = config.problems_with(&policies);
    }
});
