//! NE-1000 replies, basic (`STX … ETX`) and safe mode (`STX len … CRC ETX`): the frame decoder,
//! then the reply parser and the data-field parsers on every payload. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppu_drivers::dispenser::ne1000::protocol::{
    ReplyBody, parse_diameter, parse_direction, parse_dispensed, parse_rate, parse_reply,
    parse_volume,
};
use ppu_drivers::transport::serial::{FrameDecoder, Framing};

fn payload(p: &[u8]) {
    if let Ok(reply) = parse_reply(p)
        && let ReplyBody::Status { data, .. } = reply.body
    {
        let _ = parse_diameter(&data);
        let _ = parse_rate(&data);
        let _ = parse_volume(&data);
        let _ = parse_direction(&data);
        let _ = parse_dispensed(&data);
    }
}

fuzz_target!(|data: &[u8]| {
    payload(data);
    let mut decoder = FrameDecoder::new(Framing::Ne1000);
    decoder.push(data);
    while let Some(frame) = decoder.next_frame() {
        payload(&frame.payload);
    }
});
