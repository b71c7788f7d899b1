//! End-to-end: a bare tokio-modbus TCP client against the simulator's real socket.

use std::net::SocketAddr;
use std::time::Duration;

use ppu_drivers::Clock;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace, reg};
use ppu_sim::modbus::{serve_tcp, serve_tcp_units};
use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader, Writer, tcp};
use tokio_modbus::{ExceptionCode, Slave};

/// Generous deadline for calls that must succeed.
const OK_DEADLINE: Duration = Duration::from_secs(10);
/// Short deadline for calls that must not be answered.
const SILENT_DEADLINE: Duration = Duration::from_millis(300);

fn furnace(unit: u8) -> SimFurnace {
    let config = FurnaceConfig {
        unit_id: unit,
        ..FurnaceConfig::default()
    };
    SimFurnace::new(config, Clock::new(1.0))
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn connect(addr: SocketAddr, unit: u8) -> Context {
    timeout(OK_DEADLINE, tcp::connect_slave(addr, Slave(unit)))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

async fn read(ctx: &mut Context, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
    timeout(OK_DEADLINE, ctx.read_holding_registers(addr, count))
        .await
        .expect("read timed out")
        .expect("transport error")
}

async fn write(ctx: &mut Context, addr: u16, value: u16) -> Result<(), ExceptionCode> {
    timeout(OK_DEADLINE, ctx.write_single_register(addr, value))
        .await
        .expect("write timed out")
        .expect("transport error")
}

#[tokio::test]
async fn reads_writes_and_exceptions() {
    let f = furnace(1);
    let server = serve_tcp(any_port(), f.clone()).await.unwrap();
    let mut ctx = connect(server.local_addr(), 1).await;

    assert_eq!(read(&mut ctx, reg::PV, 1).await, Ok(vec![250]));
    assert_eq!(read(&mut ctx, reg::IDENT, 1).await, Ok(vec![0x2440]));
    assert_eq!(read(&mut ctx, reg::PV, 5).await.unwrap().len(), 5);

    write(&mut ctx, reg::TARGET_SP, 3000).await.unwrap();
    assert_eq!(read(&mut ctx, reg::TARGET_SP, 1).await, Ok(vec![3000]));
    assert_eq!(f.snapshot().target_sp_c, 300.0);

    // Function 16.
    timeout(
        OK_DEADLINE,
        ctx.write_multiple_registers(reg::SP1, &[2000, 1000]),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(
        read(&mut ctx, reg::SP1, 3).await,
        Ok(vec![2000, 1000, 250]),
        "SP1, SP2, remote SP"
    );

    // Function 04 reads the same registers.
    let input = timeout(OK_DEADLINE, ctx.read_input_registers(reg::IDENT, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(input, Ok(vec![0x2440]));

    // Exceptions come back as Modbus exceptions, and the connection stays usable.
    assert_eq!(
        write(&mut ctx, reg::TARGET_SP, 13000).await,
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        write(&mut ctx, reg::PV, 0).await,
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        read(&mut ctx, 7, 1).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        read(&mut ctx, reg::PV, 10).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        read(&mut ctx, reg::PV, 126).await,
        Err(ExceptionCode::IllegalDataValue)
    );
    let coils = timeout(OK_DEADLINE, ctx.read_coils(0, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(coils, Err(ExceptionCode::IllegalFunction));
    assert_eq!(read(&mut ctx, reg::TARGET_SP, 1).await, Ok(vec![2000]));

    server.shutdown().await;
}

#[tokio::test]
async fn unknown_unit_gets_no_reply() {
    let server = serve_tcp_units(any_port(), vec![furnace(1), furnace(2)])
        .await
        .unwrap();
    let mut two = connect(server.local_addr(), 2).await;
    assert_eq!(read(&mut two, reg::PV, 1).await, Ok(vec![250]));

    let mut three = connect(server.local_addr(), 3).await;
    let r = timeout(SILENT_DEADLINE, three.read_holding_registers(reg::PV, 1)).await;
    assert!(r.is_err(), "unit 3 answered: {r:?}");

    // Broadcast writes reach every unit without a reply.
    let mut all = connect(server.local_addr(), 0).await;
    let r = timeout(
        SILENT_DEADLINE,
        all.write_single_register(reg::TARGET_SP, 1500),
    )
    .await;
    assert!(r.is_err(), "broadcast answered: {r:?}");
    let mut one = connect(server.local_addr(), 1).await;
    assert_eq!(read(&mut one, reg::TARGET_SP, 1).await, Ok(vec![1500]));
    assert_eq!(read(&mut two, reg::TARGET_SP, 1).await, Ok(vec![1500]));

    assert!(
        serve_tcp_units(any_port(), vec![furnace(1), furnace(1)])
            .await
            .is_err()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn silent_furnace_hangs_then_recovers() {
    let f = furnace(1);
    let server = serve_tcp(any_port(), f.clone()).await.unwrap();
    let mut ctx = connect(server.local_addr(), 1).await;
    assert_eq!(read(&mut ctx, reg::PV, 1).await, Ok(vec![250]));

    f.set_silent(true);
    let r = timeout(SILENT_DEADLINE, ctx.read_holding_registers(reg::PV, 1)).await;
    assert!(r.is_err(), "silent furnace answered: {r:?}");
    let r = timeout(
        SILENT_DEADLINE,
        ctx.write_single_register(reg::TARGET_SP, 1000),
    )
    .await;
    assert!(r.is_err(), "silent furnace answered: {r:?}");
    assert_eq!(
        f.snapshot().target_sp_c,
        25.0,
        "a silent furnace ignores writes"
    );

    f.set_silent(false);
    // A new request on the same connection is answered (no stale reply in between) ...
    assert_eq!(read(&mut ctx, reg::PV, 1).await, Ok(vec![250]));
    assert_eq!(read(&mut ctx, reg::TARGET_SP, 1).await, Ok(vec![250]));
    // ... and so is one on a new connection.
    let mut fresh = connect(server.local_addr(), 1).await;
    assert_eq!(read(&mut fresh, reg::IDENT, 1).await, Ok(vec![0x2440]));

    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_drops_connections_and_frees_the_port() {
    let f = furnace(1);
    let server = serve_tcp(any_port(), f.clone()).await.unwrap();
    let addr = server.local_addr();
    let mut ctx = connect(addr, 1).await;
    write(&mut ctx, reg::TARGET_SP, 4000).await.unwrap();

    server.shutdown().await;
    let r = timeout(OK_DEADLINE, ctx.read_holding_registers(reg::PV, 1))
        .await
        .expect("a closed connection must fail fast, not hang");
    assert!(r.is_err(), "read over a shut-down server succeeded: {r:?}");

    // Same address again, same furnace state.
    let server = serve_tcp(addr, f.clone()).await.unwrap();
    assert_eq!(server.local_addr(), addr);
    let mut ctx = connect(addr, 1).await;
    assert_eq!(read(&mut ctx, reg::TARGET_SP, 1).await, Ok(vec![4000]));
    server.shutdown().await;

    // Dropping the handle stops the server as well.
    let server = serve_tcp(addr, f).await.unwrap();
    drop(server);
    let deadline = tokio::time::Instant::now() + OK_DEADLINE;
    loop {
        match tcp::connect_slave(addr, Slave(1)).await {
            Err(_) => break,
            Ok(_) => assert!(tokio::time::Instant::now() < deadline, "still accepting"),
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_program_written_over_modbus_runs_to_completion() {
    // 6000× : the program below (1 min ramp, 1 min dwell) takes about 20 ms of real time.
    let f = SimFurnace::new(FurnaceConfig::default(), Clock::new(6000.0));
    let server = serve_tcp(any_port(), f.clone()).await.unwrap();
    let mut ctx = connect(server.local_addr(), 1).await;
    let segment = |s: u16| reg::PROGRAM_DATA + 136 + 8 * s;

    // Program 1: ramp to 35.0 °C at 10.0 °C/min, dwell 1 min, end (function 16 per segment).
    for (s, words) in [(1, vec![1, 350, 100]), (2, vec![3, 0, 1]), (3, vec![0])] {
        timeout(
            OK_DEADLINE,
            ctx.write_multiple_registers(segment(s), &words),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    }
    assert_eq!(read(&mut ctx, segment(1), 3).await, Ok(vec![1, 350, 100]));
    assert_eq!(read(&mut ctx, reg::PROGRAM_NUMBER, 1).await, Ok(vec![1]));

    write(&mut ctx, reg::PROGRAM_STATE, 2).await.unwrap();
    let deadline = std::time::Instant::now() + OK_DEADLINE;
    loop {
        let state = read(&mut ctx, reg::PROGRAM_STATE, 1).await.unwrap()[0];
        if state == 16 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "program still in state {state}"
        );
        assert!(state == 2, "state {state}");
    }
    assert_eq!(read(&mut ctx, reg::WORKING_SP, 1).await, Ok(vec![350]));
    let status = read(&mut ctx, reg::STATUS, 1).await.unwrap()[0];
    assert_ne!(status & (1 << 9), 0, "program end bit in {status:#06X}");
    write(&mut ctx, reg::PROGRAM_STATE, 1).await.unwrap();
    assert_eq!(read(&mut ctx, reg::PROGRAM_STATE, 1).await, Ok(vec![1]));
}
