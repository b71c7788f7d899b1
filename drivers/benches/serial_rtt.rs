//! Round-trip time of one NE-1000 command over a simulated pty, against a bare pty echo and
//! the wire time the same exchange takes at 9600 baud.
//!
//! `cargo bench -p ppu-drivers --bench serial_rtt` (harness = false; prints a table, asserts
//! nothing). The pump command is `DIS` (`0DIS\r`, 5 bytes) answered `STX 00SI2.500W0.000ML
//! ETX` (19 bytes), sent through the full driver path: exclusive port, input flush, write,
//! frame decoding with resynchronisation, reply validation, alarm handling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ppu_drivers::Clock;
use ppu_drivers::dispenser::ne1000::protocol::Command;
use ppu_drivers::dispenser::ne1000::{Ne1000Config, Ne1000Pump};
use ppu_drivers::transport::serial::{Framing, SerialConfig};
use ppu_sim::dispenser::pump::{PumpConfig, SimPump};
use ppu_sim::pty::{FaultConfig, PtyServer, ReplyFuture, Request, RequestKind, SerialDevice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A device that echoes every request line back (the bare pty baseline).
struct Echo;

impl SerialDevice for Echo {
    fn receive(&self, bytes: &[u8]) -> Vec<Request> {
        vec![Request {
            bytes: bytes.to_vec(),
            kind: RequestKind::Plain,
        }]
    }

    fn answer(&self, request: Request) -> ReplyFuture {
        Box::pin(std::future::ready(Some(request.bytes)))
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

async fn echo_baseline(n: usize) -> (Duration, Duration) {
    let server = PtyServer::start(Arc::new(Echo), FaultConfig::default(), None)
        .await
        .expect("pty");
    let config = SerialConfig::new(server.path(), Framing::CrLf);
    let mut port = ppu_drivers::transport::serial::open_port(&config).expect("open");
    let msg = b"0123456789";
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        port.write_all(msg).await.expect("write");
        let mut got = 0;
        while got < msg.len() {
            got += port.read(&mut buf[got..]).await.expect("read");
        }
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    drop(port);
    server.shutdown().await;
    percentiles(samples)
}

async fn pump_rtt(n: usize, baud: Option<u32>) -> (Duration, Duration) {
    let clock = Clock::new(1.0);
    let sim = SimPump::new(
        PumpConfig {
            power_up_alarm: false,
            ..PumpConfig::default()
        },
        clock,
        None,
    );
    let faults = FaultConfig {
        baud_rate: baud,
        ..FaultConfig::default()
    };
    let server = PtyServer::start(Arc::new(sim), faults, None)
        .await
        .expect("pty");
    let mut serial = SerialConfig::new(server.path(), Framing::Ne1000);
    serial.timeout = Duration::from_secs(1);
    let pump = Ne1000Pump::new(Ne1000Config::new("bench", serial, "A"), None);
    let warmup = (n / 10).max(5);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + warmup {
        let t = Instant::now();
        pump.command(&Command::QueryDispensed).await.expect("DIS");
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    drop(pump);
    server.shutdown().await;
    percentiles(samples)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let request = Command::QueryDispensed.encode_basic(0).len();
    let reply = "\u{2}00SI0.000W0.000ML\u{3}".len();
    let wire_9600 = Duration::from_secs_f64((request + reply) as f64 * 10.0 / 9600.0);
    let echo = echo_baseline(2000).await;
    let pump = pump_rtt(2000, None).await;
    let paced = pump_rtt(50, Some(9600)).await;
    println!("NE-1000 `DIS` round trip over a simulated pty ({request} + {reply} bytes)");
    println!("{:<44} {:>12} {:>12}", "", "p50", "p99");
    println!(
        "{:<44} {:>12} {:>12}",
        "bare pty echo, 10 bytes (baseline)",
        ms(echo.0),
        ms(echo.1)
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "driver -> simulated pump, unpaced",
        ms(pump.0),
        ms(pump.1)
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "driver -> simulated pump, reply paced 9600",
        ms(paced.0),
        ms(paced.1)
    );
    println!(
        "{:<44} {:>12}",
        "wire time at 9600 baud (8N1), both ways",
        ms(wire_9600)
    );
    println!(
        "unpaced round trip = {:.1}x the bare echo, {:.4}x the 9600-baud wire time",
        pump.0.as_secs_f64() / echo.0.as_secs_f64(),
        pump.0.as_secs_f64() / wire_9600.as_secs_f64()
    );
}
