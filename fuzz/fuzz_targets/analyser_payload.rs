//! Payloads from an analyser's MQTT bridge: the first byte picks the topic (status, telemetry,
//! command acknowledgement, event, result, or a stranger's), the rest is the payload. The
//! driver's parser must answer every one with a message or a "malformed" error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppu_drivers::analyser::protocol::{Topics, parse};
use ppu_drivers::transport::mqtt::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let topics = Topics::new("lab/fuzz/analyser", "bridge-1");
    let topic = match pick % 6 {
        0 => topics.status(),
        1 => topics.telemetry(),
        2 => topics.cmd_ack(),
        3 => topics.event(),
        4 => topics.result(),
        _ => format!("{}/elsewhere", topics.base()),
    };
    let message = Message {
        topic,
        payload: payload.to_vec(),
        retain: pick & 0x80 != 0,
    };
    let _ = parse(&topics, &message);
});
