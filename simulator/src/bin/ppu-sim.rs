//! `ppu-sim`: run simulated lab instruments behind their real wire protocols.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Subcommand};
use ppu_drivers::Clock;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use tracing_subscriber::EnvFilter;

/// Hardware-in-the-loop simulators for ppu.
///
/// Each simulated instrument speaks its real protocol on a real socket, so drivers (and ppud)
/// talk to it exactly as they would to the hardware. Logs go to stderr; set RUST_LOG (e.g.
/// RUST_LOG=ppu_sim=debug) for more detail.
#[derive(clap::Parser, Debug)]
#[command(name = "ppu-sim", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulated Eurotherm 2000/3000-series furnace controllers on Modbus TCP.
    ///
    /// Each furnace is a box furnace (3 kW, limit 1200 °C, ambient 25 °C) behind its own Modbus
    /// TCP socket, answering only for its unit id (other unit ids get no reply, as on an RS-485
    /// bus). Register map: PV 1, target SP 2, output 3, working SP 5, rate limit 35, status 75,
    /// ident 122 (0x2440, a 2404), auto/manual 273; temperatures scaled by 10^dp. Prints each listening
    /// address on stdout, one per line, then runs until Ctrl-C.
    ///
    /// Example: ppu-sim furnace --listen 127.0.0.1:5020 --time-scale 600 --count 2
    Furnace(FurnaceArgs),
    /// A simulated dispensing station: NE-1000 syringe pumps and an MT-SICS balance, each on
    /// its own pseudo-terminal.
    ///
    /// Point a driver, a terminal program or pyserial at the printed paths as at /dev/ttyUSB0
    /// (9600 8N1; ports open exclusively). Pumps: `0DIA14.43\r`, `0RAT1.000MM\r`, `0VOL2.5\r`,
    /// `0RUN\r`, `0DIS\r` … answered `STX 00S … ETX`; safe mode after `0SAF n\r`; `*ADR\r`
    /// queries the address. Balance: `S\r\n`, `SI\r\n` (answered `S S …` stable or `S D …`
    /// dynamic), `T\r\n`, `Z\r\n`, `TAC\r\n`, `I4\r\n`. What the pumps deliver lands
    /// in the vessel on the balance. Prints `ID PATH` per device on stdout, then runs until
    /// Ctrl-C.
    ///
    /// Example: ppu-sim dispenser --reagent A=1.0 --reagent B=0.789 --link-dir /tmp/ppu-tty
    Dispenser(DispenserArgs),
    /// A simulated volumetric sorption analyser behind its MQTT bridge (docs/mqtt-contract.md).
    ///
    /// The bridge connects to --broker as a separate MQTT client, as a lab's bridge on the
    /// instrument PC would; with --embedded-broker it first starts rumqttd on that address
    /// and uses it. Samples whose id contains 13X, MOF-74 or HKUST are those reference
    /// materials; others are zeolite 13X. Runs until Ctrl-C.
    ///
    /// Example: ppu-sim analyser --embedded-broker 127.0.0.1:1883 --bridge-id asap-1 --time-scale 600
    Analyser(AnalyserArgs),
}

#[derive(clap::Args, Debug)]
struct AnalyserArgs {
    /// Broker the bridge connects to, mqtt://HOST:PORT (ignored with --embedded-broker).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Start an embedded broker (rumqttd) on this address and connect to it.
    #[arg(long)]
    embedded_broker: Option<SocketAddr>,
    /// Topic prefix: topics are PREFIX/BRIDGE_ID/...
    #[arg(long, default_value = "lab/ppu/analyser")]
    topic_prefix: String,
    /// The bridge's id in its topics.
    #[arg(long, default_value = "asap-1")]
    bridge_id: String,
    /// Physical seconds per real second (600: a 2-hour degas takes 12 s).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed of the material model and the measurement noise.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct DispenserArgs {
    /// One pump per reagent, as NAME=DENSITY (g/mL); pumps are named pump-a, pump-b, …
    #[arg(long = "reagent", default_values_t = ["A=1.0".to_owned(), "B=0.789".to_owned()])]
    reagents: Vec<String>,

    /// No balance under the station.
    #[arg(long)]
    no_balance: bool,

    /// Syringe capacity of every pump, mL (each starts full).
    #[arg(long, default_value_t = 10.0)]
    syringe_ml: f64,

    /// Syringe inner diameter at power-up, mm (volumes count in µL up to 14.0 mm).
    #[arg(long, default_value_t = 14.43)]
    diameter_mm: f64,

    /// Physical seconds per real second (plunger travel, balance settling).
    #[arg(long, default_value_t = 1.0, env = "PPU_SIM_TIME_SCALE")]
    time_scale: f64,

    /// Create stable symlinks DIR/<id> to the ptys (like /dev/serial/by-id).
    #[arg(long)]
    link_dir: Option<std::path::PathBuf>,

    /// Pace replies at this baud rate (10 bit times per byte); 0 = as fast as the pty.
    #[arg(long, default_value_t = 0)]
    baud: u32,

    /// Instrument latency before each reply, ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,

    /// Probability of a garbage burst before a reply (0–1).
    #[arg(long, default_value_t = 0.0)]
    garbage: f64,

    /// Probability that a reply loses one byte (0–1).
    #[arg(long, default_value_t = 0.0)]
    drop_byte: f64,

    /// Probability that a reply is not sent (0–1).
    #[arg(long, default_value_t = 0.0)]
    no_reply: f64,

    /// Seed of the line faults and the balance noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct FurnaceArgs {
    /// Address of the first furnace; further furnaces use the following ports. Port 0 lets
    /// the OS pick a free port for each.
    #[arg(long, default_value = "127.0.0.1:5020", env = "PPU_SIM_LISTEN")]
    listen: SocketAddr,

    /// Physical seconds per real second (600: one real second is ten furnace minutes).
    #[arg(long, default_value_t = 1.0, env = "PPU_SIM_TIME_SCALE")]
    time_scale: f64,

    /// Modbus unit (slave) id of every furnace, 1-247.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=247))]
    unit: u8,

    /// Number of furnaces, on consecutive ports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    count: u16,

    /// Decimal places of temperatures in the integer registers (0-3).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=3))]
    decimal_places: u8,

    /// Ambient (and initial) temperature, °C.
    #[arg(long, default_value_t = 25.0, allow_negative_numbers = true)]
    ambient: f64,

    /// Standard deviation of the PV noise, °C (0 = none).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,

    /// Seed of the PV noise (each furnace adds its index).
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Instrument ident answered at register 122, hex (2440 is a 2404, 2480 a 2408).
    #[arg(long, default_value = "2440", value_parser = parse_ident)]
    ident: u16,

    /// Serve every furnace on one Modbus RTU line (a pty, replies paced at this baud rate,
    /// e.g. 9600 or 19200) instead of TCP sockets, at unit ids --unit, --unit + 1, …; prints
    /// `modbus-rtu://PATH@BAUD`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(300..=115_200))]
    rtu_baud: Option<u32>,
}

fn parse_ident(s: &str) -> Result<u16, String> {
    let digits = s.trim_start_matches("0x").trim_start_matches("0X");
    u16::from_str_radix(digits, 16).map_err(|e| format!("expected a hex word such as 2440: {e}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Plugin families add their own subcommands.
    let command =
        ppu_sim::registry::families().fold(Cli::command(), |c, f| c.subcommand(f.command()));
    let matches = command.get_matches();
    if let Some((name, args)) = matches.subcommand()
        && let Some(family) = ppu_sim::registry::family(name)
    {
        return family.run(args.clone()).await;
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Furnace(args) => run_furnaces(args).await,
        Command::Dispenser(args) => run_dispenser(args).await,
        Command::Analyser(args) => run_analyser(args).await,
    }
}

async fn run_analyser(args: AnalyserArgs) -> Result<()> {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    let mut embedded = None;
    let (host, port) = match args.embedded_broker {
        Some(addr) => {
            let b = ppu_sim::broker::EmbeddedBroker::start(addr)
                .await
                .with_context(|| format!("cannot start the embedded broker on {addr}"))?;
            let a = b.addr();
            println!("broker {}", b.url());
            embedded = Some(b);
            (a.ip().to_string(), a.port())
        }
        None => {
            let rest = args
                .broker
                .strip_prefix("mqtt://")
                .context("--broker must be mqtt://HOST:PORT")?;
            let (h, p) = rest
                .rsplit_once(':')
                .context("--broker must be mqtt://HOST:PORT")?;
            (h.to_owned(), p.parse::<u16>().context("--broker port")?)
        }
    };
    let mut config = ppu_sim::analyser::SimAnalyserConfig::new(host, port, args.bridge_id.clone());
    config.topic_prefix = args.topic_prefix;
    config.seed = args.seed;
    let world = ppu_sim::world::World::new(args.seed);
    let sim = ppu_sim::analyser::start(config, world, Clock::new(args.time_scale));
    println!("bridge {} on topics {}/#", args.bridge_id, sim.base_topic());
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    sim.shutdown().await;
    if let Some(b) = embedded {
        b.shutdown().await;
    }
    Ok(())
}

async fn run_dispenser(args: DispenserArgs) -> Result<()> {
    use ppu_sim::dispenser::balance::BalanceConfig;
    use ppu_sim::dispenser::pump::PumpConfig;
    use ppu_sim::dispenser::{PumpSpec, SimStation, StationSpec};
    use ppu_sim::pty::FaultConfig;

    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    for (name, p) in [
        ("--garbage", args.garbage),
        ("--drop-byte", args.drop_byte),
        ("--no-reply", args.no_reply),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} must be a probability between 0 and 1");
        }
    }
    if args.reagents.len() > 26 {
        bail!("at most 26 pumps (pump-a … pump-z)");
    }
    let mut pumps = Vec::new();
    for (i, r) in args.reagents.iter().enumerate() {
        let (name, density) = r
            .split_once('=')
            .with_context(|| format!("--reagent {r}: expected NAME=DENSITY"))?;
        let density: f64 = density
            .parse()
            .ok()
            .filter(|d: &f64| d.is_finite() && *d > 0.0)
            .with_context(|| format!("--reagent {r}: density must be a positive number"))?;
        pumps.push(PumpSpec {
            id: format!("pump-{}", char::from(b'a' + i as u8)),
            config: PumpConfig {
                reagent: name.to_owned(),
                density_g_per_ml: density,
                syringe_volume_ml: args.syringe_ml,
                contents_ml: args.syringe_ml,
                diameter_mm: args.diameter_mm,
                ..PumpConfig::default()
            },
        });
    }
    if let Some(dir) = &args.link_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let spec = StationSpec {
        pumps,
        balance: (!args.no_balance).then(|| {
            (
                "balance-1".to_owned(),
                BalanceConfig {
                    seed: args.seed,
                    ..BalanceConfig::default()
                },
            )
        }),
        faults: FaultConfig {
            seed: args.seed,
            drop_byte: args.drop_byte,
            garbage: args.garbage,
            no_reply: args.no_reply,
            baud_rate: (args.baud > 0).then_some(args.baud),
            latency: std::time::Duration::from_millis(args.latency_ms),
        },
        link_dir: args.link_dir.clone(),
        world: None,
        chain: None,
    };
    let clock = Clock::new(args.time_scale);
    let station = SimStation::start(spec, clock)
        .await
        .context("opening pseudo-terminals")?;
    for p in &station.pumps {
        println!("{} {}", p.id, p.port.path());
    }
    if let Some(b) = &station.balance {
        println!("{} {}", b.id, b.port.path());
    }
    tracing::info!(
        pumps = station.pumps.len(),
        balance = station.balance.is_some(),
        time_scale = args.time_scale,
        "dispensing station running; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tracing::info!("stopping");
    station.shutdown().await;
    Ok(())
}

/// `ppu-sim furnace --rtu-baud N`: every furnace on one simulated RS-485 line.
async fn run_rtu_line(args: &FurnaceArgs, clock: Clock, baud: u32) -> Result<()> {
    let mut furnaces = Vec::new();
    for i in 0..args.count {
        let unit = u16::from(args.unit) + i;
        let unit = u8::try_from(unit)
            .ok()
            .filter(|u| *u <= 247)
            .context("unit ids exceed 247")?;
        let config = FurnaceConfig {
            unit_id: unit,
            decimal_places: args.decimal_places,
            ambient_c: args.ambient,
            initial_sp_c: args.ambient.max(0.0),
            pv_noise_c: args.noise,
            seed: args.seed.wrapping_add(u64::from(i)),
            ..FurnaceConfig::default()
        };
        furnaces.push(SimFurnace::new(config, clock));
    }
    let line = ppu_sim::rtu::serve_rtu_units(furnaces, baud, None)
        .await
        .context("opening a pseudo-terminal")?;
    println!("modbus-rtu://{}@{baud}", line.path());
    tracing::info!(
        count = args.count,
        first_unit = args.unit,
        baud,
        time_scale = args.time_scale,
        "furnaces running on one RTU line; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tracing::info!("stopping");
    line.shutdown().await;
    Ok(())
}

async fn run_furnaces(args: FurnaceArgs) -> Result<()> {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    if !(args.noise.is_finite() && args.noise >= 0.0) {
        bail!("--noise must be a non-negative number");
    }
    let clock = Clock::new(args.time_scale);
    if let Some(baud) = args.rtu_baud {
        return run_rtu_line(&args, clock, baud).await;
    }
    let mut servers: Vec<ServerHandle> = Vec::new();
    for i in 0..args.count {
        let mut addr = args.listen;
        if addr.port() != 0 {
            let port = addr
                .port()
                .checked_add(i)
                .context("port range exceeds 65535")?;
            addr.set_port(port);
        }
        let config = FurnaceConfig {
            unit_id: args.unit,
            decimal_places: args.decimal_places,
            ambient_c: args.ambient,
            initial_sp_c: args.ambient.max(0.0),
            pv_noise_c: args.noise,
            seed: args.seed.wrapping_add(u64::from(i)),
            ident: args.ident,
            ..FurnaceConfig::default()
        };
        let furnace = SimFurnace::new(config, clock);
        let server = serve_tcp(addr, furnace)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{}", server.local_addr());
        servers.push(server);
    }
    tracing::info!(
        count = servers.len(),
        unit = args.unit,
        time_scale = args.time_scale,
        "furnaces running; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tracing::info!("stopping");
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}
