//! `ppud` — the ppu lab daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ppu_daemon::app::{Daemon, Options, Security};
use ppu_daemon::auth::{self, Mode, Role};
use ppu_daemon::config::{Config, KeyLines, LogFormat, Policies};
use ppu_daemon::devices::PollSettings;
use ppu_daemon::systemd::Notifier;
use ppu_drivers::Clock;
use std::time::Duration;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
// What only `ppud dev` (the `dev-lab` feature) uses.
#[cfg(feature = "dev-lab")]
use {
    ppu_daemon::app::LocalSocket,
    ppu_daemon::auth::{Authenticator, Tokens},
    ppu_daemon::config::{DEFAULT_LISTEN, FleetConfig},
    ppu_daemon::dev::{DevLab, TransferRobot},
    ppu_daemon::recovery::{AdoptPolicy, OnRestart, RecoveryPolicy},
    ppu_daemon::security::{DEFAULT_SILA_LISTEN, SilaSettings},
    std::net::SocketAddr,
    std::sync::Arc,
};

/// Baud rate of `ppud dev`'s simulated RS-485 line of furnaces.
#[cfg(feature = "dev-lab")]
const DEV_RTU_BAUD: u32 = 19_200;

/// The log filter without `--log` or RUST_LOG: ppu's crates at INFO, third-party ones at WARN.
const DEFAULT_LOG: &str = "warn,ppud=info,ppu_daemon=info,ppu_drivers=info,ppu_sim=info,\
                           ppu_sila=info,ppu_schema=info,ppu_proto=info";

/// The ppu lab daemon: a durable experiment queue that runs recipes on lab devices
/// (furnaces, pumps, balances, sorption analysers) and streams results to planners over gRPC.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter, e.g. `info`, `debug`, `ppu_daemon=debug,info` (also read from RUST_LOG).
    /// Default: INFO for ppu's own crates, WARN for the libraries under them (the MQTT broker,
    /// HTTP/2, ...), so a start shows what ppu does and no library chatter.
    #[arg(
        long,
        global = true,
        env = "RUST_LOG",
        default_value = DEFAULT_LOG,
        hide_default_value = true
    )]
    log: String,
    /// Log line format: `text` for people, `json` (one object per line) for log shippers.
    /// Every line of an RPC carries its request id. Default: the config's [log] format, else
    /// text.
    #[arg(long, global = true, env = "PPU_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

// Parsed once per run: the size of the `dev` variant's options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the daemon together with a simulated lab in one process: simulated Eurotherm furnaces
    /// on one Modbus RTU line (a pseudo-terminal at 19200 baud, unit ids 1, 2, …; each also
    /// behind a Modbus TCP socket on loopback), driven by the real drivers. Physical time runs
    /// --time-scale times faster, so a 2-hour furnace program takes about 12 s by default.
    /// A dispensing station (two NE-1000 syringe pumps, reagents A and B, daisy-chained on one
    /// pseudo-terminal, over an MT-SICS balance on another) runs too; its paths are printed.
    ///
    /// Example: `ppud dev` then, in another terminal, `ppuctl submit examples/batch.toml`.
    #[cfg(feature = "dev-lab")]
    Dev {
        /// gRPC listen address (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Where the store lives. Kept across runs, so queued work survives a restart.
        #[arg(long, default_value = "ppu-dev-data")]
        data_dir: PathBuf,
        /// Physical seconds per real second for holds, ramps and the simulated physics.
        #[arg(long, default_value_t = 600.0)]
        time_scale: f64,
        /// Number of simulated furnaces (furnace-1, furnace-2, …).
        #[arg(long, default_value_t = 2)]
        furnaces: usize,
        /// Number of simulated sorption analysers (analyser-1, …), each a separate MQTT client
        /// of an embedded broker (rumqttd) on loopback.
        #[arg(long, default_value_t = 1)]
        analysers: usize,
        /// Real milliseconds the simulated lab's robot takes to carry out a sample transfer
        /// before it confirms it (through the same path as QueueService.ConfirmTransfer).
        #[arg(long, default_value_t = 200)]
        transfer_delay_ms: u64,
        /// What a restart does with experiments that were running: `interrupt` marks them
        /// INTERRUPTED, `resume` runs them on from the interrupted step (config: [recovery]
        /// on_restart).
        #[arg(long, default_value_t = OnRestart::Interrupt)]
        on_restart: OnRestart,
        /// A device family (e.g. `furnace`) whose steps found still running after a restart
        /// are re-attached to and supervised to their end instead of driven to the safe
        /// state (config: [recovery] FAMILY = "adopt"); repeatable. The simulated devices live
        /// in this process, so they restart cold with it; adoption shows against `ppu-sim`
        /// and `ppud serve`.
        #[arg(long = "adopt", value_name = "FAMILY")]
        adopt: Vec<String>,
        /// Require bearer tokens from this token file (see `ppud token`). Without it the dev
        /// daemon runs OPEN — every caller is an admin — and says so at start-up.
        #[arg(long)]
        tokens_file: Option<PathBuf>,
        /// Also serve gRPC on this Unix socket (mode 0660; peers without a token get the
        /// technician role, the daemon's own user and root admin).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Serve SiLA 2 here (every device family a feature, plus ExperimentQueue), advertised
        /// over mDNS as `_sila._tcp` (config: [sila]).
        #[arg(long, default_value = DEFAULT_SILA_LISTEN)]
        sila_listen: SocketAddr,
        /// Do not serve SiLA 2.
        #[arg(long)]
        no_sila: bool,
        /// SubmitBatch calls per principal per minute before RESOURCE_EXHAUSTED (0: no
        /// limit; config: [limits] submit_per_minute). A limit against runaway loops, far
        /// above what a planner sends; a benchmark may lift it, a test may lower it.
        #[arg(long, default_value_t = ppu_daemon::limits::DEFAULT_SUBMIT_PER_MINUTE)]
        submit_per_minute: u32,
        /// Run no dispensing station (pumps and balance): with --furnaces and --analysers, a
        /// lab of a fleet gets its own device set.
        #[arg(long)]
        no_dispensers: bool,
        /// Start none of the plugin families' simulated devices.
        #[arg(long)]
        no_plugins: bool,
        /// Join a fleet on NATS JetStream at this server (repeatable: a cluster's servers):
        /// publish the event log, take fleet work, heartbeat in the registry (config: [fleet]
        /// servers).
        #[arg(long = "fleet", value_name = "NATS_URL")]
        fleet: Vec<String>,
        /// This lab's id in the fleet (config: [fleet] lab); default the host name.
        #[arg(long, requires = "fleet")]
        lab_id: Option<String>,
        /// Replicas of the fleet streams and buckets this lab creates (config: [fleet]
        /// replicas): 1 for a single NATS server.
        #[arg(long, default_value_t = 3, requires = "fleet")]
        fleet_replicas: usize,
        /// Fleet experiments this lab holds at once (config: [fleet] capacity); default the
        /// number of devices.
        #[arg(long, requires = "fleet")]
        fleet_capacity: Option<usize>,
    },
    /// A build without the `dev-lab` feature (the deployed ppud) has no simulated lab; `ppud
    /// dev` then says how to get one instead of "unrecognized subcommand".
    #[cfg(not(feature = "dev-lab"))]
    #[command(hide = true, disable_help_flag = true)]
    Dev {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        _args: Vec<String>,
    },
    /// Run the daemon against the real devices a TOML config names.
    /// See deploy/ppud.example.toml for every key.
    Serve {
        /// Path of the TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Allow plain-text gRPC on a non-loopback `listen` address (config:
        /// insecure_plaintext). Bearer tokens and lab data then cross the network in clear;
        /// prefer [tls].
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Make a new bearer token for a principal. Prints the token (give it to the client; it is
    /// shown only now) and the `[[token]]` entry to append to the daemon's tokens_file, which
    /// stores only its SHA-256. Reload ppud (`systemctl reload ppud`, or SIGHUP) to load the
    /// changed file.
    ///
    /// Roles: viewer (read only), planner (submit, cancel its own batches, read), technician
    /// (queue control, maintenance, alarms, transfers, cancel any), admin (everything).
    Token {
        /// Who the token identifies, as it will appear in the audit trail.
        #[arg(long)]
        principal: String,
        /// viewer, planner, technician or admin.
        #[arg(long)]
        role: Role,
    },
    /// Validate a config file and print every problem found; exits non-zero if there are any.
    CheckConfig {
        /// Path of the TOML config.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `serve` takes its log format from the config unless the flag says otherwise.
    let loaded = match &cli.command {
        Command::Serve { config, .. } => Some(Config::load_with_policies(config)),
        _ => None,
    };
    let format = cli.log_format.unwrap_or(match &loaded {
        Some(Ok((_, p))) => p.security.log.format,
        _ => LogFormat::Text,
    });
    init_logging(&cli.log, format);
    match cli.command {
        #[cfg(not(feature = "dev-lab"))]
        Command::Dev { .. } => anyhow::bail!(
            "this ppud was built without the simulated lab (cargo feature `dev-lab`, left out \
             of deployment builds); run `cargo run --release --bin ppud -- dev` in the source \
             tree, or build with default features"
        ),
        #[cfg(feature = "dev-lab")]
        Command::Dev {
            listen,
            data_dir,
            time_scale,
            furnaces,
            analysers,
            transfer_delay_ms,
            on_restart,
            adopt,
            tokens_file,
            socket,
            metrics_listen,
            sila_listen,
            no_sila,
            submit_per_minute,
            no_dispensers,
            no_plugins,
            fleet,
            lab_id,
            fleet_replicas,
            fleet_capacity,
        } => {
            anyhow::ensure!(
                time_scale.is_finite() && time_scale > 0.0,
                "--time-scale must be a positive number"
            );
            let clock = Clock::new(time_scale);
            let mut lab = DevLab::start(clock, furnaces)
                .await
                .context("starting the simulated lab")?;
            lab.add_analysers(analysers)
                .await
                .context("starting the simulated analysers and their MQTT broker")?;
            lab.add_furnace_line(DEV_RTU_BAUD)
                .await
                .context("starting the simulated RS-485 line of furnaces")?;
            if !no_dispensers {
                lab.add_dispensing_station()
                    .await
                    .context("starting the simulated dispensing station")?;
            }
            if !no_plugins {
                lab.add_plugin_families()
                    .await
                    .context("starting the simulated devices of the plugin families")?;
            }
            let config = Config {
                listen,
                data_dir,
                time_scale,
                poll: Default::default(),
                buses: lab.bus_configs(),
                devices: lab.device_configs(),
            };
            let poll = PollSettings {
                poll_interval: Duration::from_millis(250),
                reading_log_interval: Duration::from_secs(5),
            };
            println!(
                "ppud dev: simulated lab at time scale {time_scale}x, data in {}",
                config.data_dir.display()
            );
            for f in &lab.furnaces {
                let line = lab.furnace_line.as_ref().map_or(String::new(), |l| {
                    format!(
                        ", used through bus {} (modbus-rtu://{}@{}) unit {}",
                        ppu_daemon::dev::DEV_RTU_BUS,
                        l.pty.path(),
                        l.baud_rate,
                        f.sim.unit_id()
                    )
                });
                println!(
                    "  device {}: simulated Eurotherm at modbus-tcp://{}{line}",
                    f.id,
                    f.server.local_addr()
                );
            }
            if let Some(broker) = &lab.broker {
                for a in &lab.analysers {
                    println!(
                        "  device {}: simulated sorption analyser, bridge on {} topics {}/#",
                        a.id,
                        broker.url(),
                        a.sim.base_topic()
                    );
                }
            }
            for p in &lab.plugins {
                println!("  device {}: {}", p.id, p.description);
            }
            if let Some(station) = &lab.dispensing {
                for p in &station.pumps {
                    let c = p.sim.config();
                    println!(
                        "  device {}: simulated NE-1000 pump ({}, {} mL syringe) at address {} of the chain {} on {}",
                        p.id,
                        c.reagent,
                        c.syringe_volume_ml,
                        c.address,
                        ppu_daemon::dev::DEV_PUMP_BUS,
                        p.port.path()
                    );
                }
                if let Some(b) = &station.balance {
                    println!(
                        "  device {}: simulated MT-SICS balance on {}",
                        b.id,
                        b.port.path()
                    );
                }
            }
            let policies = Policies {
                recovery: adopt.iter().fold(
                    RecoveryPolicy {
                        on_restart,
                        ..RecoveryPolicy::default()
                    },
                    |p, family| p.with_family(family, AdoptPolicy::Adopt),
                ),
                fleet: (!fleet.is_empty()).then_some(FleetConfig {
                    servers: fleet,
                    lab: lab_id,
                    user: None,
                    password: None,
                    nkey_seed_file: None,
                    creds_file: None,
                    tls: None,
                    replicas: fleet_replicas,
                    capacity: fleet_capacity,
                    heartbeat_s: 2.0,
                }),
                ..Policies::default()
            };
            if let Some(Err(problems)) = policies.fleet_settings() {
                anyhow::bail!("{}", problems.join("\n"));
            }
            let mut auth = Authenticator::default();
            if let Some(file) = &tokens_file {
                auth.mode = Mode::Tokens(Tokens::load(file)?);
            }
            let mut security = Security {
                auth,
                local: socket.map(|path| LocalSocket {
                    path,
                    mode: 0o660,
                    role: Role::Technician,
                    allowed_uids: Vec::new(),
                }),
                metrics_listen,
                sila: (!no_sila).then(|| SilaSettings {
                    mdns: true,
                    ..SilaSettings::at(sila_listen)
                }),
                ..Security::default()
            };
            security.limits.submit_per_minute = submit_per_minute;
            lab.restore_syringes(&config.data_dir)
                .await
                .context("reading the syringe fills recorded in the data dir")?;
            let lab = Arc::new(lab);
            let robot = (lab.clone(), Duration::from_millis(transfer_delay_ms));
            run(config, &policies, security, poll, clock, Some(robot)).await?;
            if let Ok(lab) = Arc::try_unwrap(lab) {
                lab.shutdown().await;
            }
            Ok(())
        }
        Command::Serve {
            insecure_plaintext, ..
        } => {
            let (config, mut policies) = loaded.context("config not loaded")??;
            policies.security.insecure_plaintext |= insecure_plaintext;
            let security = policies
                .security
                .resolve(config.listen)
                .map_err(|problems| anyhow::anyhow!(problems.join("\n")))?;
            let clock = Clock::new(config.time_scale);
            let poll = config.poll.settings();
            for d in &config.devices {
                println!("  device {}", d.id());
            }
            run(config, &policies, security, poll, clock, None).await
        }
        Command::Token { principal, role } => {
            anyhow::ensure!(
                !principal.trim().is_empty(),
                "--principal must not be empty"
            );
            let token = auth::generate_token().context("reading the OS random source")?;
            println!("token (give it to {principal}; it is not stored and not shown again):");
            println!("{token}");
            println!();
            println!(
                "append to the daemon's tokens_file, then reload ppud (systemctl reload ppud, \
                 or SIGHUP):"
            );
            println!("[[token]]");
            println!("principal = {principal:?}");
            println!("role = \"{role}\"");
            println!("sha256 = \"{}\"", auth::hex(&auth::hash_token(&token)));
            Ok(())
        }
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (config, policies) = match Config::parse_unchecked(&text, &file) {
                Ok(parsed) => parsed,
                Err(e) => {
                    // Already `FILE:LINE: key.path: reason`.
                    println!("{e}");
                    anyhow::bail!("1 problem in {}", file.display())
                }
            };
            let problems = config.problems_with(&policies);
            if problems.is_empty() {
                println!("{}: ok ({} devices)", file.display(), config.devices.len());
                Ok(())
            } else {
                // `FILE:LINE: key.path: reason`, the line of the key the problem names.
                let lines = KeyLines::new(&text);
                for p in &problems {
                    match lines.line_of_problem(p) {
                        Some(line) => println!("{}:{line}: {p}", file.display()),
                        None => println!("{}: {p}", file.display()),
                    }
                }
                anyhow::bail!("{} problem(s) in {}", problems.len(), file.display())
            }
        }
    }
}

/// `ppud dev`'s simulated lab and its transfer robot's delay; nothing in a build without it.
#[cfg(feature = "dev-lab")]
type Robot = (Arc<DevLab>, Duration);
#[cfg(not(feature = "dev-lab"))]
type Robot = std::convert::Infallible;

/// Runs the daemon until SIGINT/SIGTERM; with `robot`, the simulated lab's transfer robot
/// (lab, delay) runs alongside it.
async fn run(
    config: Config,
    policies: &Policies,
    security: Security,
    poll: PollSettings,
    clock: Clock,
    robot: Option<Robot>,
) -> Result<()> {
    let mut signals = Signals::new();
    let drivers = config.drivers().map_err(anyhow::Error::msg)?;
    let scheme = if security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let socket = security.local.as_ref().map(|l| l.path.clone());
    let open = matches!(security.auth.mode, Mode::Open);
    let daemon = Daemon::start_with(
        Options {
            listen: config.listen,
            data_dir: config.data_dir.clone(),
            clock,
            poll,
            security,
        },
        policies,
        drivers,
    )
    .await?;
    #[cfg(feature = "dev-lab")]
    let robot =
        robot.map(|(lab, delay)| TransferRobot::start(lab, daemon.scheduler().clone(), delay));
    // One line on stdout that scripts and tests can wait for.
    println!("listening on {}", daemon.addr());
    println!("  grpc: {scheme}://{}", daemon.addr());
    if let Some(path) = socket {
        println!("  grpc: unix:{}", path.display());
    }
    if let Some(addr) = daemon.metrics_addr() {
        println!("  metrics: http://{addr}/metrics");
    }
    if let Some(addr) = daemon.sila_addr() {
        println!("  sila: {scheme}://{addr}");
    }
    if let Some(Ok(f)) = policies.fleet_settings() {
        println!(
            "  fleet: lab {} on {}",
            f.lab,
            ppu_daemon::fleet::redacted_servers(&f.servers)
        );
    }
    if open {
        println!(
            "  auth: OPEN, every caller is an admin (loopback only; require tokens with \
             --tokens-file or [auth] tokens_file)"
        );
    }
    // systemd (Type=notify): ready now that the store is open, the devices are configured and
    // the listener is bound.
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NOTIFY_SOCKET is unusable; not notifying systemd");
            None
        }
    };
    let notify = |state: &str| {
        if let Some(n) = &notifier
            && let Err(e) = n.notify(state)
        {
            warn!(error = %e, state, "could not notify systemd");
        }
    };
    notify(&format!(
        "READY=1\nSTATUS=serving gRPC on {}",
        daemon.addr()
    ));
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    let watchdog = match (&notifier, ppu_daemon::systemd::watchdog_interval()) {
        (Some(n), Some(interval)) => Some(tokio::spawn(watchdog(
            n.clone(),
            interval,
            daemon.liveness(),
            watchdog_stop.clone(),
        ))),
        _ => None,
    };
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => {
                notify(&ppu_daemon::systemd::reloading());
                match daemon.reload() {
                    Ok(done) => info!(reloaded = %done.join("; "), "reloaded on SIGHUP"),
                    Err((done, e)) => error!(
                        reloaded = %done.join("; "),
                        error = %e,
                        "reload on SIGHUP failed; what failed keeps its previous files"
                    ),
                }
                notify("READY=1");
            }
        }
    }
    notify("STOPPING=1\nSTATUS=stopping: devices to their safe state");
    if let Some(r) = robot {
        #[cfg(feature = "dev-lab")]
        r.stop().await;
        #[cfg(not(feature = "dev-lab"))]
        match r {}
    }
    daemon.shutdown().await;
    watchdog_stop.cancel();
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    Ok(())
}

/// Pings the service watchdog every half interval while the daemon is alive; a failed check
/// withholds the ping, so systemd restarts a wedged daemon after `WatchdogSec`. Runs through
/// the shutdown too (which may take minutes to leave every device safe).
async fn watchdog(
    notifier: Notifier,
    interval: Duration,
    liveness: ppu_daemon::app::Liveness,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match liveness.check().await {
            Ok(()) => {
                if let Err(e) = notifier.notify("WATCHDOG=1") {
                    warn!(error = %e, "could not ping the systemd watchdog");
                }
            }
            Err(why) => error!(reason = %why, "not alive: withholding the watchdog ping"),
        }
    }
}

/// What a signal asks of the daemon.
enum Signal {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP: re-read the token file.
    Reload,
}

/// The signals ppud acts on, registered once at start-up: from then on a SIGHUP reloads
/// instead of killing the process, even between two waits.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn next(&mut self) -> Signal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            _ = recv(&mut self.term) => Signal::Stop,
            _ = recv(&mut self.hup) => Signal::Reload,
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("ppud: ignoring the log filter {filter:?} ({e}); using the default");
        EnvFilter::new(DEFAULT_LOG)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Spans (request id, method, principal) ride along on every line of a call.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
