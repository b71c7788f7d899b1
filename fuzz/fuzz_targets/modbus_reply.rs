//! A Modbus RTU controller's reply to the Eurotherm driver's register read, as arbitrary
//! bytes: tokio-modbus's RTU client decodes it over an in-memory line whose far end sends the
//! input and then hangs up, so every input ends in a reply, an error or end of file — never a
//! wait. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_modbus::client::Reader;
use tokio_modbus::prelude::Slave;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let (client, mut device) = tokio::io::duplex(4096);
        let reply = data.to_vec();
        let device_side = async move {
            let _ = device.write_all(&reply).await;
            let _ = device.shutdown().await;
            // Keep reading the request so the client's write never blocks.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut device, &mut sink).await;
        };
        let mut ctx = tokio_modbus::client::rtu::attach_slave(client, Slave(1));
        let client_side = async move {
            // PV .. working SP, as the driver's snapshot reads them.
            let _ = ctx.read_holding_registers(1, 5).await;
        };
        tokio::join!(device_side, client_side);
    });
});
