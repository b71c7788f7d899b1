//! `ppuctl fleet`: the labs of a fleet and their state, from the registry bucket `PPU_LABS` on
//! NATS JetStream (docs/fleet.md). Talks to NATS only, never to a ppud.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::StreamExt;
use serde::Deserialize;

/// The registry bucket (ppud's `fleet::LABS_BUCKET`).
const LABS_BUCKET: &str = "PPU_LABS";
/// Longest wait for NATS.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// A NATS server of the fleet, nats://[USER:PASSWORD@]HOST:PORT (repeatable).
    #[arg(
        long = "nats",
        env = "PPU_NATS",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// A NATS .creds file (JWT and nkey seed).
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed (SU…).
    #[arg(long)]
    pub nkey_seed_file: Option<PathBuf>,
    /// The CA that signed the NATS servers' certificates (TLS).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for NATS servers that verify clients (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// A lab's registry entry as ppud writes it.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Lab {
    lab: String,
    #[serde(default)]
    devices: Vec<Device>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    queue_depth: u64,
    #[serde(default)]
    running: u64,
    #[serde(default)]
    capacity: u64,
    #[serde(default)]
    heartbeat: String,
    #[serde(default)]
    last_event_sequence: u64,
    #[serde(default)]
    published_sequence: u64,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Device {
    id: String,
    #[serde(default)]
    family: String,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    state: String,
}

pub async fn run(args: &FleetArgs, json: bool) -> Result<()> {
    let labs = tokio::time::timeout(TIMEOUT, read(args))
        .await
        .with_context(|| format!("no answer from NATS within {} s", TIMEOUT.as_secs()))??;
    if json {
        println!("{}", serde_json::to_string_pretty(&labs)?);
        return Ok(());
    }
    if labs.is_empty() {
        println!("no labs (none has a current heartbeat in {LABS_BUCKET})");
        return Ok(());
    }
    println!(
        "{:<16} {:>8} {:>7} {:>8} {:>12}  {:<30}  DEVICES / CAPABILITIES",
        "LAB", "CAPACITY", "QUEUED", "RUNNING", "UNPUBLISHED", "HEARTBEAT"
    );
    for l in &labs {
        let unpublished = l.last_event_sequence.saturating_sub(l.published_sequence);
        let not_ready = l.devices.iter().filter(|d| d.state != "ready").count();
        let devices = if not_ready == 0 {
            format!("{} devices", l.devices.len())
        } else {
            format!("{} devices ({not_ready} not ready)", l.devices.len())
        };
        println!(
            "{:<16} {:>8} {:>7} {:>8} {:>12}  {:<30}  {devices}: {}",
            l.lab,
            l.capacity,
            l.queue_depth,
            l.running,
            unpublished,
            l.heartbeat,
            l.capabilities.join(", ")
        );
        for d in l.devices.iter().filter(|d| d.state != "ready") {
            println!("{:<16}   {} ({}): {}", "", d.id, d.family, d.state);
        }
    }
    Ok(())
}

async fn read(args: &FleetArgs) -> Result<Vec<Lab>> {
    let mut opts = async_nats::ConnectOptions::new().name("ppuctl fleet");
    if let Some(creds) = &args.creds {
        opts = opts
            .credentials_file(creds)
            .await
            .with_context(|| format!("--creds {}", creds.display()))?;
    }
    if let Some(path) = &args.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("--nkey-seed-file {}", path.display()))?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if args.tls_ca.is_some() || args.tls_cert.is_some() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &args.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let addrs = args
        .servers
        .iter()
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("--nats {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    // The client does not send credentials written in a server URL: pass the first URL's on.
    if args.creds.is_none()
        && args.nkey_seed_file.is_none()
        && let Some(a) = addrs.iter().find(|a| a.username().is_some())
    {
        let user = a.username().unwrap_or_default().to_owned();
        opts = match a.password() {
            Some(pass) => opts.user_and_password(user, pass.to_owned()),
            None => opts.token(user),
        };
    }
    let client = opts.connect(addrs).await.context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    let Ok(kv) = js.get_key_value(LABS_BUCKET).await else {
        bail!("no {LABS_BUCKET} bucket: no lab has joined this fleet yet");
    };
    let mut keys: Vec<String> = Vec::new();
    let mut listed = kv.keys().await.context("listing the labs")?;
    while let Some(k) = listed.next().await {
        keys.push(k.context("listing the labs")?);
    }
    keys.sort();
    let mut labs = Vec::new();
    for k in keys {
        if let Some(v) = kv.get(&k).await.context("reading a lab's entry")? {
            match serde_json::from_slice::<Lab>(&v) {
                Ok(l) => labs.push(l),
                Err(e) => eprintln!("warning: lab {k}: unreadable entry: {e}"),
            }
        }
    }
    Ok(labs)
}
