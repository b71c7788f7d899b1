//! MT-SICS replies as a balance (or line noise) may send them: the line decoder, then the
//! driver's reply parser on every line it delimits. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppu_drivers::balance::sics::protocol::parse_reply;
use ppu_drivers::transport::serial::{FrameDecoder, Framing};

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply(data);
    let mut decoder = FrameDecoder::new(Framing::CrLf);
    decoder.push(data);
    while let Some(frame) = decoder.next_frame() {
        let _ = parse_reply(&frame.payload);
    }
});
