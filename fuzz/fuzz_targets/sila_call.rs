//! A `sila_call` step as a planner writes it: the feature, the command and the parameters'
//! JSON text, checked against the simulated shaker's FDL by the `sila2` driver at submission.
//! The first byte picks the feature and command, the rest is the parameters' text. Every input
//! must be accepted or refused with a reason, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ppu_drivers::sila2::Model;
use ppu_drivers::sila2::schema::Call;

static MODEL: OnceLock<Model> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let model = MODEL.get_or_init(|| {
        Model::from_fdl(&[
            include_str!("../../simulator/sila/ShakerController.sila.xml"),
            include_str!("../../simulator/sila/CancelController.sila.xml"),
        ])
        .expect("the shaker's FDL reads")
    });
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (feature, command) = match pick % 5 {
        0 => ("ShakerController", "Shake"),
        1 => ("ShakerController", "Stop"),
        2 => ("CancelController", "CancelCommand"),
        3 => ("org.ppu/simulation/ShakerController/v1", "Shake"),
        _ => ("Incubator", "Open"),
    };
    let call = Call {
        feature: feature.into(),
        command: command.into(),
        parameters: String::from_utf8_lossy(rest).into_owned(),
    };
    let _ = model.check(&call, "fuzz");
});
