//! `ppuctl`, the command-line client of the ppu lab daemon (`ppud`, gRPC API `ppu.v1`).
//!
//! Every command is one or two RPCs; human output is rendered by [`render`], `--json` output by
//! [`json`], and batch files are read by [`batch_file`]. Errors are reported at this edge as
//! `error: <CODE>: <message>` with exit code 2 for caller mistakes and 1 for everything else.

use ppuctl::batch_file;
mod conn;
mod export;
mod families;
mod fleet;
mod json;
mod render;
mod tui;
mod watch;

use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ppu_proto::v1 as pb;
use ppu_proto::v1::device_service_client::DeviceServiceClient;
use ppu_proto::v1::event_service_client::EventServiceClient;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1::queue_service_client::QueueServiceClient;
use tonic::{Code, Status};

use conn::{Channel, Conn, Tuning};

/// How long a unary RPC may take before ppuctl gives up.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// StreamEvents response header: the sequence the stream starts after (ppu.v1 events.proto).
const STREAM_AFTER: &str = "ppu-stream-after";

// ---------------------------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Parser)]
#[command(
    name = "ppuctl",
    version,
    about = "Command-line client of ppud, the ppu lab daemon",
    long_about = "Command-line client of ppud, the ppu lab daemon: submit batches of experiments, \
                  follow their progress, inspect the queue and the lab's devices.\n\n\
                  ppuctl talks to ppud over gRPC (API ppu.v1). Errors are printed as \
                  `error: <CODE>: <message>` on stderr; the exit code is 2 when the request \
                  itself was refused (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, \
                  NOT_FOUND, OUT_OF_RANGE, or an unreadable batch file) and 1 for any other \
                  failure.\n\n\
                  Ids: experiment, batch and transfer ids may be given as any unique prefix, \
                  in either case (git style), or as a unique suffix after `…` or `...` (as the \
                  TUI shows ids of one batch); an ambiguous one is refused with the ids it \
                  matches.\n\n\
                  Connecting: --addr takes host:port or http://host:port (plain text), \
                  https://host:port (TLS: --tls-ca names the CA that signed ppud's certificate; \
                  --tls-cert and --tls-key add a client certificate where ppud requires one) or \
                  unix:/path/to/ppud.sock (ppud's local socket; without a token the daemon \
                  grants the role its config gives local users).\n\n\
                  Authentication: ppud asks for a bearer token unless it runs open. ppuctl \
                  reads it from the file named by --token-file or PPU_TOKEN_FILE, else from the \
                  PPU_TOKEN environment variable, and sends it on every call. There is no flag \
                  taking the token itself: it would show in `ps`. UNAUTHENTICATED means the \
                  token is missing or not accepted; PERMISSION_DENIED means the token's role \
                  (viewer, planner, technician, admin) may not make that call.\n\n\
                  Environment: PPU_ADDR (--addr), PPU_TOKEN_FILE (--token-file), PPU_TOKEN (the \
                  token).",
    after_help = "Examples:\n  \
        ppuctl submit examples/batch.toml\n  \
        ppuctl list --state running\n  \
        ppuctl watch --batch 01JQ3Z8K4W6Y5T2R9P0N1M7XVB\n  \
        ppuctl --addr http://lab-pc:50051 devices\n  \
        ppuctl --json show 01JQ3Z9A1B2C3D4E5F6G7H8J9K | jq .state\n  \
        PPU_TOKEN_FILE=~/.config/ppu/token ppuctl list\n  \
        ppuctl --addr https://lab-pc:50051 --tls-ca lab-ca.crt --token-file token devices\n  \
        ppuctl --addr unix:/run/ppu/ppud.sock queue pause --reason maintenance"
)]
struct Cli {
    #[command(flatten)]
    conn: conn::ConnArgs,

    /// Print machine-readable JSON instead of tables and text.
    ///
    /// Keys are the proto field names, enums their full proto names
    /// (e.g. EXPERIMENT_STATE_RUNNING), timestamps RFC 3339. Streams (`watch`,
    /// `device --watch`) print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit a batch of experiments from a TOML or JSON file.
    #[command(
        long_about = "Submit a batch of experiments from a TOML or JSON file (SubmitBatch).\n\n\
            The format is picked by extension: .toml or .json; `-` reads JSON from stdin. See \
            examples/batch.toml for the documented format. The file is checked locally first \
            (unknown keys, missing fields, a step with zero or several kinds are refused with \
            the path of the problem, e.g. experiments[0].steps[1]); the daemon then checks it \
            against the device limits and stores it durably before replying.\n\n\
            Idempotency: the key is --key if given, else the file's `idempotency_key`, else \
            `sha256:` + the SHA-256 of the file's bytes. Submitting the same file again (or \
            retrying after a lost reply) therefore never enqueues twice: ppud returns the \
            original batch and ppuctl reports it as a duplicate. Reusing a key with different \
            content fails with ALREADY_EXISTS.",
        after_help = "Examples:\n  \
            ppuctl submit examples/batch.toml\n  \
            ppuctl submit round-2.json --key calcination-round-2\n  \
            generate-batch | ppuctl submit -"
    )]
    Submit(SubmitArgs),

    /// List experiments, newest first, with optional filters.
    #[command(after_help = "Examples:\n  \
        ppuctl list\n  \
        ppuctl list --state queued --sort oldest\n  \
        ppuctl list --since 2h\n  \
        ppuctl list --since 2026-05-01T08:00:00Z --state failed\n  \
        ppuctl list --batch 01JQ3Z8K4W6Y5T2R9P0N1M7XVB --all\n  \
        ppuctl list --label campaign=co2-sorbents --label round=1 --limit 20")]
    List(ListArgs),

    /// Show one experiment: its steps, state and per-step results.
    #[command(after_help = "Examples:\n  \
        ppuctl show 01JQ3Z9A1B2C3D4E5F6G7H8J9K\n  \
        ppuctl --json show 01JQ3Z9A1B2C3D4E5F6G7H8J9K | jq '.results[0].furnace.targets'")]
    Show {
        /// Experiment id.
        id: String,
    },

    /// Follow the event log live, one line per event (new events only; --from-start replays).
    #[command(
        long_about = "Follow the daemon's durable event log (StreamEvents), one line per event: \
            sequence, time, kind, the ids it concerns and a readable summary.\n\n\
            By default only events from now on are shown (the live tail). --from N replays \
            every event after sequence N first, --from-start the whole log; a sequence past \
            the end of the log is refused (OUT_OF_RANGE, exit 2) naming the newest one. \
            Filters (--experiment, --batch, --device, --kind) are applied by the daemon; ids \
            may be any unique prefix, in either case.\n\n\
            On a terminal, step progress is collapsed into one status line rewritten in place; \
            piped or with --json, every event is a line of its own. If the connection drops \
            (daemon restart, network), ppuctl reconnects with backoff and resumes right after \
            the last sequence it printed: no gap and no duplicate. Ctrl-C exits with status 0.",
        after_help = "Examples:\n  \
            ppuctl watch                        # new events, live\n  \
            ppuctl watch --from-start           # the whole log, then live\n  \
            ppuctl watch --from 1200            # only events after sequence 1200\n  \
            ppuctl watch --experiment 01jq3z9a  # one experiment, by id prefix\n  \
            ppuctl watch --kind experiment_state_changed,alarm --device furnace-1\n  \
            ppuctl --json watch --batch 01JQ3Z8K4W6Y5T2R9P0N1M7XVB | jq -c .step_progress"
    )]
    Watch(WatchArgs),

    /// Cancel an experiment (queued: at once; running: abort its step, make the device safe).
    #[command(after_help = "Examples:\n  \
        ppuctl cancel 01JQ3Z9A1B2C3D4E5F6G7H8J9K\n  \
        ppuctl cancel 01JQ3Z9A1B2C3D4E5F6G7H8J9K --reason \"wrong precursor loaded\"\n  \
        ppuctl cancel 01JQ3Z9A1B2C3D4E5F6G7H8J9K --after-current-step")]
    Cancel {
        /// Experiment id.
        id: String,
        /// Why; recorded in the experiment's message and in the event log.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
        /// For a running experiment: let the current step finish, then cancel before the next
        /// one (instead of aborting the step now).
        #[arg(long)]
        after_current_step: bool,
    },

    /// Show the queue, or pause, resume, abort or reorder it, or hold/release an experiment.
    #[command(after_help = "Examples:\n  \
        ppuctl queue\n  \
        ppuctl queue pause --reason \"furnace-1 maintenance\"\n  \
        ppuctl queue resume\n  \
        ppuctl queue abort --reason \"power cut announced\"\n  \
        ppuctl queue move 01JQ3Z9A1B2C3D4E5F6G7H8J9K 0\n  \
        ppuctl queue hold 01JQ3Z9A1B2C3D4E5F6G7H8J9K --reason \"precursor not delivered\"\n  \
        ppuctl queue release 01JQ3Z9A1B2C3D4E5F6G7H8J9K")]
    Queue {
        #[command(subcommand)]
        action: Option<QueueAction>,
    },

    /// List the sample transfers the scheduler is waiting for.
    #[command(after_help = "Examples:\n  \
        ppuctl transfers\n  \
        ppuctl transfer confirm 01JQ40C5N2B7V1X3Z9K8M4P6QR --by alice")]
    Transfers,

    /// Act on a pending sample transfer.
    Transfer {
        #[command(subcommand)]
        action: TransferAction,
    },

    /// List alarms that are active or not yet acknowledged.
    #[command(after_help = "Examples:\n  \
        ppuctl alarms\n  \
        ppuctl alarms --device furnace-1\n  \
        ppuctl alarm ack furnace-1 sensor_break --by alice")]
    Alarms {
        /// Only this device's alarms.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
    },

    /// Act on one alarm.
    Alarm {
        #[command(subcommand)]
        action: AlarmAction,
    },

    /// Export a step's result as CSV (one row per item of its table, e.g. isotherm points or a trace) or JSON, or an adsorption isotherm as AIF (readable by pyGAPS).
    #[command(after_help = "Examples:\n  \
        ppuctl export 01JQ3Z9A1B2C3D4E5F6G7H8J9K > sample.aif\n  \
        ppuctl export 01JQ3Z9A1B2C3D4E5F6G7H8J9K --format csv -o sample.csv\n  \
        ppuctl export 01JQ3Z9A1B2C3D4E5F6G7H8J9K --format json --step 3")]
    Export(export::ExportArgs),

    /// List the lab's devices with their connection state and key readings.
    #[command(after_help = "Example:\n  ppuctl devices")]
    Devices,

    /// Terminal UI for technicians: queue, devices with live readings, alarms and events,
    /// and the actions taken at the bench (each confirmed first). Press ? for the keys.
    #[command(after_help = "Examples:\n  \
        ppuctl tui\n  \
        ppuctl --addr http://lab-pc:50051 tui --by alice\n  \
        NO_COLOR=1 ppuctl tui")]
    Tui(tui::TuiArgs),

    /// Show one device (limits, latest reading), follow its live readings with --watch, or
    /// take it into or out of maintenance with --maintenance.
    #[command(after_help = "Examples:\n  \
        ppuctl device furnace-1\n  \
        ppuctl device furnace-1 --watch\n  \
        ppuctl device furnace-1 --maintenance on --reason \"thermocouple replacement\"\n  \
        ppuctl device furnace-1 --maintenance off")]
    Device {
        /// Device id, e.g. furnace-1.
        id: String,
        /// Stream live readings (WatchDevice) until Ctrl-C, reconnecting if the link drops.
        #[arg(long, conflicts_with = "maintenance")]
        watch: bool,
        /// Take the device into (on) or out of (off) maintenance. A device in maintenance
        /// takes no new reservations; a step already running on it finishes.
        #[arg(long, value_enum, value_name = "on|off")]
        maintenance: Option<OnOff>,
        /// Why (with --maintenance); recorded in the event log.
        #[arg(long, value_name = "TEXT", requires = "maintenance")]
        reason: Option<String>,
    },

    /// List the labs of a fleet and their state, from the NATS registry PPU_LABS (needs no
    /// daemon: it talks to NATS).
    #[command(after_help = "Examples:\n  \
        ppuctl fleet --nats nats://127.0.0.1:4222\n  \
        ppuctl --json fleet --nats nats://planner:secret@nats-1:4222 | jq '.[].lab'\n  \
        PPU_NATS=nats://nats-1:4222,nats://nats-2:4222 ppuctl fleet --creds planner.creds")]
    Fleet(fleet::FleetArgs),

    /// Print a completion script for bash, zsh or fish (needs no daemon).
    #[command(after_help = "Examples:\n  \
        ppuctl completions bash > ~/.local/share/bash-completion/completions/ppuctl\n  \
        ppuctl completions zsh > ~/.zfunc/_ppuctl    # with fpath+=(~/.zfunc) in ~/.zshrc\n  \
        ppuctl completions fish > ~/.config/fish/completions/ppuctl.fish")]
    Completions {
        #[arg(value_enum)]
        shell: ShellArg,
    },

    /// Print ppuctl's man page, or a subcommand's (roff, section 1; needs no daemon).
    #[command(after_help = "Examples:\n  \
        ppuctl man | man -l -\n  \
        ppuctl man watch | man -l -\n  \
        ppuctl man > ~/.local/share/man/man1/ppuctl.1\n  \
        for c in $(ppuctl man --list); do ppuctl man $c > ppuctl-$c.1; done")]
    Man {
        /// The subcommand whose page to print (its page is ppuctl-SUBCOMMAND(1)).
        #[arg(value_name = "SUBCOMMAND", conflicts_with = "list")]
        subcommand: Option<String>,
        /// List the subcommands that have a page, one per line.
        #[arg(long)]
        list: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum TransferAction {
    /// Confirm that the sample was moved; the waiting step completes.
    Confirm {
        /// Transfer id, as listed by `ppuctl transfers`.
        #[arg(value_name = "TRANSFER_ID")]
        id: String,
        /// Who moved the sample (operator name, robot id); recorded in the event log.
        #[arg(long, value_name = "NAME", env = "USER", default_value = "")]
        by: String,
    },
}

#[derive(Debug, Subcommand)]
enum AlarmAction {
    /// Acknowledge an alarm (on the device too, where it supports that).
    Ack {
        /// Device id.
        device: String,
        /// Alarm code, e.g. sensor_break.
        code: String,
        /// Who acknowledges it (operator name); recorded in the event log.
        #[arg(long, value_name = "NAME", env = "USER", default_value = "")]
        by: String,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Batch file: *.toml or *.json, or `-` for JSON on stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Idempotency key (at most 128 bytes); overrides the file's `idempotency_key`.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only experiments in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only experiments of this batch.
    #[arg(long, value_name = "ID")]
    batch: Option<String>,
    /// Only experiments carrying this label (repeat to require several).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Only experiments submitted since then: an RFC 3339 time (2026-05-01T08:00:00Z), a date
    /// (2026-05-01, UTC midnight) or an age (90s, 30m, 2h, 7d).
    #[arg(long, value_name = "TIME|AGE", value_parser = parse_since)]
    since: Option<prost_types::Timestamp>,
    /// Order by submission time: newest first (the default) or oldest first.
    #[arg(long, value_enum, default_value_t = SortArg::Newest)]
    sort: SortArg,
    /// Experiments per page (1..=1000; the daemon's default is 100). Without --all only the
    /// first page is shown.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Fetch every page, not just the first.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Replay the events after this sequence (the last one already seen), then follow live.
    /// Without it (and without --from-start) only new events are shown.
    #[arg(long = "from", value_name = "SEQ", conflicts_with = "from_start")]
    from: Option<u64>,
    /// Replay the whole log from its first event, then follow live (same as --from 0).
    #[arg(long)]
    from_start: bool,
    /// Only events of this batch (id or unique prefix).
    #[arg(long, value_name = "ID")]
    batch: Option<String>,
    /// Only events of this experiment (id or unique prefix).
    #[arg(long, value_name = "ID")]
    experiment: Option<String>,
    /// Only events of this device, e.g. furnace-1.
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// Only events of these kinds (repeat, or separate with commas): experiment_state_changed,
    /// step_started, step_progress, step_finished, device_reading, alarm, audit, …  (the
    /// field names of ppu.v1 `Event.kind`; the daemon lists them all for an unknown one).
    #[arg(long = "kind", value_name = "KIND", value_delimiter = ',')]
    kinds: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// Start no new experiment (running ones finish). Durable across daemon restarts.
    Pause {
        /// Why; recorded in the event log.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Let the queue start experiments again.
    Resume,
    /// Pause the queue and abort every running step: devices go to their safe state and the
    /// running experiments become CANCELLED.
    Abort {
        /// Why; recorded on the cancelled experiments and in the event log.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Move a queued experiment to a position in the start order (0 = next; past the end
    /// means last). Its priority becomes that of its new neighbours.
    Move {
        /// Experiment id.
        id: String,
        /// New position, 0 = next.
        position: u32,
    },
    /// Hold a queued experiment: it keeps its place but does not start until released.
    Hold {
        /// Experiment id.
        id: String,
        /// Why; recorded in the event log.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Release a held experiment.
    Release {
        /// Experiment id.
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SortArg {
    /// Newest first.
    Newest,
    /// Oldest first (submission order).
    Oldest,
}

/// `--since`: an RFC 3339 time, a date (midnight UTC) or an age before now.
fn parse_since(s: &str) -> Result<prost_types::Timestamp, String> {
    let s = s.trim();
    let age = s
        .char_indices()
        .last()
        .and_then(|(i, unit)| Some((s[..i].parse::<u64>().ok()?, unit)))
        .and_then(|(n, unit)| {
            let per = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return None,
            };
            n.checked_mul(per)
        });
    if let Some(secs) = age {
        let then = std::time::SystemTime::now()
            .checked_sub(Duration::from_secs(secs))
            .ok_or_else(|| format!("{s:?} reaches before 1970"))?;
        return Ok(prost_types::Timestamp::from(then));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    full.parse().map_err(|_| {
        format!(
            "expected an RFC 3339 time (2026-05-01T08:00:00Z), a date (2026-05-01) or an age \
             (90s, 30m, 2h, 7d), got {s:?}"
        )
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

impl From<StateArg> for pb::ExperimentState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Queued => pb::ExperimentState::Queued,
            StateArg::Running => pb::ExperimentState::Running,
            StateArg::Succeeded => pb::ExperimentState::Succeeded,
            StateArg::Failed => pb::ExperimentState::Failed,
            StateArg::Cancelled => pb::ExperimentState::Cancelled,
            StateArg::Interrupted => pb::ExperimentState::Interrupted,
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and output.
// ---------------------------------------------------------------------------------------------

/// A problem with what the user gave us (file, arguments): reported with exit code 2.
#[derive(Debug)]
struct InputError(String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Exit status for a gRPC failure: 2 when the request itself was refused, 1 otherwise.
fn exit_code_for(code: Code) -> u8 {
    match code {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::NotFound
        | Code::OutOfRange => 2,
        _ => 1,
    }
}

/// The peer at --addr is not a gRPC server; the detail says what it did instead.
#[derive(Debug)]
struct NotGrpc(String);

impl fmt::Display for NotGrpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotGrpc {}

/// Whether a failed call's transport error means the peer is no gRPC server: its first bytes
/// were no HTTP/2 frame ([`not_grpc`]), or it closed the connection and answers a plain
/// HTTP/1.1 request (an HTTP/1-only server such as ppud's metrics port drops an HTTP/2
/// preface unanswered).
async fn not_grpc_endpoint(status: &Status, conn: &Conn) -> Option<NotGrpc> {
    if let Some(detail) = not_grpc(status) {
        return Some(NotGrpc(format!("it did not answer in HTTP/2: {detail}")));
    }
    let transport = matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Cancelled
    ) && std::error::Error::source(status).is_some();
    if !transport {
        return None;
    }
    let line = conn.http1_status_line().await?;
    Some(NotGrpc(format!("it answers HTTP/1.1: \"{line}\"")))
}

/// Whether `status` says the peer did not speak HTTP/2 at all: the first bytes it sent (an
/// HTTP/1.1 reply from a metrics port, a TLS alert from a TLS port addressed with http://)
/// do not parse as an HTTP/2 frame. Returns the detail for the message.
fn not_grpc(status: &Status) -> Option<String> {
    if !matches!(status.code(), Code::Internal | Code::Unknown) {
        return None;
    }
    let detail = conn::with_causes(
        status.message().to_owned(),
        std::error::Error::source(status),
    );
    let framing =
        detail.contains("frame with invalid size") || detail.contains("unspecific protocol error");
    (detail.contains("h2 protocol error") && framing).then_some(detail)
}

/// Prints an error to stderr and returns the exit code for it. `conn` (once resolved) feeds
/// the hints: where the token came from (never the token itself), whether TLS was used.
fn report(err: &anyhow::Error, addr: &str, conn: Option<&Conn>) -> u8 {
    let token = conn.and_then(|c| c.token_source.as_ref());
    let detail = err
        .chain()
        .find_map(|e| e.downcast_ref::<NotGrpc>().map(|n| n.0.clone()))
        .or_else(|| {
            err.chain()
                .find_map(|e| e.downcast_ref::<Status>())
                .and_then(not_grpc)
                .map(|d| format!("it did not answer in HTTP/2: {d}"))
        });
    if let Some(detail) = detail {
        eprintln!(
            "error: {addr} is not a gRPC endpoint ({detail}); is it ppud's metrics port, \
             another service, or a TLS port addressed with http://? Point --addr (or PPU_ADDR) \
             at ppud's gRPC listen address (default 127.0.0.1:50051)"
        );
        return 1;
    }
    if let Some(status) = err.chain().find_map(|e| e.downcast_ref::<Status>()) {
        let message = if status.message().is_empty() {
            status.code().description()
        } else {
            status.message()
        };
        // A failed connection's cause (refused, no such socket, certificate not trusted) is in
        // the source chain, not the message.
        let message = conn::with_causes(message.to_owned(), std::error::Error::source(status));
        eprintln!("error: {}: {message}", code_name(status.code()));
        // A daemon that wants a client certificate completes the TLS 1.3 handshake and then
        // drops the connection: the request fails CANCELLED ("connection closed") or, if the
        // alert arrives first, UNKNOWN from the transport (a status with a source; a status
        // the daemon sent has none).
        let dropped = status.code() == Code::Cancelled
            || (status.code() == Code::Unknown && std::error::Error::source(status).is_some());
        if message.contains("CertificateRequired")
            || (dropped && conn.is_some_and(Conn::tls_without_identity))
        {
            eprintln!(
                "hint: if ppud requires client certificates (mTLS), pass --tls-cert and --tls-key"
            );
        } else if (dropped || status.code() == Code::Unavailable) && message.contains("certificate")
        {
            eprintln!(
                "hint: the TLS handshake failed: --tls-ca must name the CA that signed ppud's \
                 certificate, and the certificate must name the --addr host (or --tls-domain)"
            );
        } else if status.code() == Code::Unavailable {
            eprintln!("hint: is ppud running at {addr}? (set --addr or PPU_ADDR)");
        }
        if status.code() == Code::Unauthenticated {
            match token {
                None => eprintln!(
                    "hint: ppud at {addr} wants a bearer token: set PPU_TOKEN or --token-file \
                     FILE (or PPU_TOKEN_FILE)"
                ),
                Some(source) => eprintln!(
                    "hint: ppud at {addr} did not accept the token from {source}; set PPU_TOKEN \
                     or --token-file to a valid one (`ppud token` makes one)"
                ),
            }
        }
        // ppud explains its own UNIMPLEMENTED replies; a bare one comes from a daemon that
        // predates the RPC.
        if status.code() == Code::Unimplemented && status.message().is_empty() {
            eprintln!("hint: the ppud at {addr} is older than this ppuctl");
        }
        return exit_code_for(status.code());
    }
    eprintln!("error: {err:#}");
    if err.chain().any(|e| e.is::<InputError>()) {
        2
    } else {
        1
    }
}

/// Writes to stdout; a closed pipe (`ppuctl watch | head`) ends the program quietly.
fn out(text: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e).context("cannot write to stdout"),
    }
}

fn out_line(text: &str) -> Result<()> {
    let mut s = String::with_capacity(text.len() + 1);
    s.push_str(text);
    s.push('\n');
    out(&s)
}

fn out_json(value: &serde_json::Value) -> Result<()> {
    out_line(&serde_json::to_string_pretty(value)?)
}

// ---------------------------------------------------------------------------------------------
// Connection helpers.
// ---------------------------------------------------------------------------------------------

/// Awaits a unary RPC with [`RPC_TIMEOUT`].
async fn call<T>(
    rpc: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT, rpc).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no reply from ppud within {} s",
            RPC_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether retrying a stream after this error can help.
fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Exponential reconnect delay: 250 ms doubling to 10 s, reset once data flows again.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Backoff {
            first: Self::FIRST,
            max: Self::MAX,
            next: Self::FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = self.first;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

// ---------------------------------------------------------------------------------------------
// Commands.
// ---------------------------------------------------------------------------------------------

/// Writes what the command line itself defines (completions, man page): no connection.
fn offline(command: &Command) -> Option<Result<()>> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => {
            let shell = match shell {
                ShellArg::Bash => clap_complete::Shell::Bash,
                ShellArg::Zsh => clap_complete::Shell::Zsh,
                ShellArg::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut cmd, "ppuctl", &mut text);
        }
        Command::Man { list: true, .. } => {
            let names: Vec<&str> = cmd
                .get_subcommands()
                .map(clap::Command::get_name)
                .filter(|n| *n != "help")
                .collect();
            return Some(out(&format!("{}\n", names.join("\n"))));
        }
        Command::Man { subcommand, .. } => {
            let page = match subcommand {
                None => cmd,
                Some(name) => {
                    cmd.build();
                    let Some(sub) = cmd.find_subcommand(name) else {
                        return Some(Err(InputError(format!(
                            "no subcommand {name:?}; `ppuctl man --list` lists them"
                        ))
                        .into()));
                    };
                    sub.clone()
                        .display_name(format!("ppuctl-{name}"))
                        .bin_name(format!("ppuctl {name}"))
                        .version(env!("CARGO_PKG_VERSION"))
                }
            };
            let title = page
                .get_display_name()
                .unwrap_or(page.get_name())
                .to_owned();
            if let Err(e) = clap_mangen::Man::new(page).title(title).render(&mut text) {
                return Some(Err(
                    anyhow::Error::new(e).context("cannot render the man page")
                ));
            }
        }
        _ => return None,
    }
    Some(out(&String::from_utf8_lossy(&text)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The fleet's registry is on NATS: no connection to a ppud.
    if let Command::Fleet(args) = &cli.command {
        return match fleet::run(args, cli.json).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(result) = offline(&cli.command) {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => ExitCode::from(report(&err, &cli.conn.addr, None)),
        };
    }
    let conn = match cli.conn.resolve() {
        Ok(conn) => conn,
        Err(err) => return ExitCode::from(report(&err.into(), &cli.conn.addr, None)),
    };
    if let Some(warning) = conn.plaintext_warning() {
        eprintln!("{warning}");
    }
    match run(cli, &conn).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let status = err.chain().find_map(|e| e.downcast_ref::<Status>());
            let err = match status {
                Some(status) => match not_grpc_endpoint(status, &conn).await {
                    Some(not) => anyhow::Error::new(not),
                    None => err,
                },
                None => err,
            };
            ExitCode::from(report(&err, &conn.addr, Some(&conn)))
        }
    }
}

async fn run(cli: Cli, conn: &Conn) -> Result<()> {
    let ch = conn.channel(Tuning::CLI)?;
    let json = cli.json;
    // Commands that read a batch file or show steps and results read them through the
    // daemon's family schema; the others never ask for it.
    let needs_schema = matches!(
        &cli.command,
        Command::Submit(_)
            | Command::List(_)
            | Command::Show { .. }
            | Command::Watch(_)
            | Command::Cancel { .. }
            | Command::Queue { .. }
            | Command::Export(_)
            | Command::Tui(_)
    );
    if needs_schema {
        families::fetch(ch.clone()).await;
    }
    match cli.command {
        Command::Submit(args) => submit(ch, args, json).await,
        Command::List(args) => list(ch, args, json).await,
        Command::Show { id } => show(ch, id, json).await,
        Command::Watch(args) => watch(ch, conn, args, json).await,
        Command::Cancel {
            id,
            reason,
            after_current_step,
        } => cancel(ch, id, reason, after_current_step, json).await,
        Command::Queue { action } => queue(ch, action, json).await,
        Command::Transfers => transfers(ch, json).await,
        Command::Transfer {
            action: TransferAction::Confirm { id, by },
        } => confirm_transfer(ch, id, by, json).await,
        Command::Alarms { device } => alarms(ch, device, json).await,
        Command::Alarm {
            action: AlarmAction::Ack { device, code, by },
        } => acknowledge_alarm(ch, device, code, by, json).await,
        Command::Export(args) => export::run(ch, args).await,
        Command::Devices => devices(ch, json).await,
        Command::Tui(args) => tui::run(conn, args).await,
        Command::Device {
            id,
            maintenance: Some(on),
            reason,
            ..
        } => set_maintenance(ch, id, on == OnOff::On, reason.unwrap_or_default(), json).await,
        Command::Device {
            id, watch: false, ..
        } => device(ch, id, json).await,
        Command::Device {
            id, watch: true, ..
        } => watch_device(ch, id, json).await,
        // Written by `main` before any connection.
        Command::Completions { .. } | Command::Man { .. } | Command::Fleet(_) => Ok(()),
    }
}

async fn submit(ch: Channel, args: SubmitArgs, json: bool) -> Result<()> {
    let from_stdin = args.file.as_os_str() == "-";
    let shown = if from_stdin {
        "<stdin>".to_owned()
    } else {
        args.file.display().to_string()
    };
    let format =
        batch_file::Format::from_path(&args.file).map_err(|e| InputError(e.to_string()))?;
    let bytes = if from_stdin {
        let mut buf = Vec::new();
        io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| InputError(format!("{shown}: {e}")))?;
        buf
    } else {
        std::fs::read(&args.file).map_err(|e| InputError(format!("cannot read {shown}: {e}")))?
    };
    let batch = batch_file::parse(&bytes, format, families::get())
        .map_err(|e| InputError(format!("{shown}: {e}")))?;
    let key = args
        .key
        .or(batch.idempotency_key.filter(|k| !k.is_empty()))
        .unwrap_or_else(|| batch_file::content_key(&bytes));
    let names: Vec<String> = batch.experiments.iter().map(|e| e.name.clone()).collect();

    let mut client = ExperimentServiceClient::new(ch);
    let request = pb::SubmitBatchRequest {
        idempotency_key: key.clone(),
        experiments: batch.experiments,
    };
    let reply = call(client.submit_batch(request)).await?;
    if json {
        return out_json(&json::submit_response(&reply));
    }
    let b = reply.batch.unwrap_or_default();
    let mut text = format!(
        "batch:       {}\nkey:         {}\n",
        b.id, b.idempotency_key
    );
    if reply.duplicate {
        text.push_str(
            "duplicate:   yes — this key was already accepted; nothing new was enqueued\n",
        );
    } else {
        text.push_str("duplicate:   no\n");
    }
    text.push_str(&format!("experiments: {}\n", b.experiment_ids.len()));
    for (i, id) in b.experiment_ids.iter().enumerate() {
        match names
            .get(i)
            .filter(|_| names.len() == b.experiment_ids.len())
        {
            Some(name) => text.push_str(&format!("  {id}  {name}\n")),
            None => text.push_str(&format!("  {id}\n")),
        }
    }
    out(&text)
}

async fn list(ch: Channel, args: ListArgs, json: bool) -> Result<()> {
    let mut client = ExperimentServiceClient::new(ch);
    let mut request = pb::ListExperimentsRequest {
        state: args
            .state
            .map_or(pb::ExperimentState::Unspecified, Into::into) as i32,
        batch_id: args.batch.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
        page_size: args.limit.unwrap_or(0),
        page_token: String::new(),
        newest_first: args.sort == SortArg::Newest,
        created_since: args.since,
    };
    let mut experiments = Vec::new();
    let next_page_token = loop {
        let page = call(client.list_experiments(request.clone())).await?;
        experiments.extend(page.experiments);
        if !args.all || page.next_page_token.is_empty() {
            break page.next_page_token;
        }
        request.page_token = page.next_page_token;
    };
    if json {
        return out_json(&serde_json::json!({
            "experiments": experiments.iter().map(json::experiment).collect::<Vec<_>>(),
            "next_page_token": next_page_token,
        }));
    }
    if experiments.is_empty() {
        eprintln!("no experiments match");
        return Ok(());
    }
    out(&render::experiment_table(&experiments))?;
    if !next_page_token.is_empty() {
        eprintln!("(more experiments: pass --all to list every page)");
    }
    Ok(())
}

async fn show(ch: Channel, id: String, json: bool) -> Result<()> {
    let mut client = ExperimentServiceClient::new(ch);
    let e = call(client.get_experiment(pb::GetExperimentRequest { id })).await?;
    if json {
        out_json(&json::experiment(&e))
    } else {
        out(&render::experiment_detail(&e))
    }
}

async fn cancel(
    ch: Channel,
    id: String,
    reason: String,
    after_current_step: bool,
    json: bool,
) -> Result<()> {
    let mut client = ExperimentServiceClient::new(ch);
    let e = call(client.cancel_experiment(pb::CancelExperimentRequest {
        id,
        reason,
        after_current_step,
    }))
    .await?;
    if json {
        return out_json(&json::experiment(&e));
    }
    let mut text = format!("experiment {}: {}", e.id, render::experiment_state(e.state));
    if e.state == pb::ExperimentState::Running as i32 {
        if after_current_step {
            text.push_str(" (cancellation requested; it stops when the current step finishes)");
        } else {
            text.push_str(" (cancellation requested; the step is being aborted)");
        }
    }
    if !e.message.is_empty() {
        text.push_str(&format!("\n  message: {}", e.message));
    }
    out_line(&text)
}

async fn queue(ch: Channel, action: Option<QueueAction>, json: bool) -> Result<()> {
    let mut client = QueueServiceClient::new(ch);
    let q = match action {
        None => call(client.get_queue(pb::GetQueueRequest {})).await?,
        Some(QueueAction::Pause { reason }) => {
            call(client.pause_queue(pb::PauseQueueRequest { reason })).await?
        }
        Some(QueueAction::Resume) => call(client.resume_queue(pb::ResumeQueueRequest {})).await?,
        Some(QueueAction::Abort { reason }) => {
            call(client.abort_queue(pb::AbortQueueRequest { reason })).await?
        }
        Some(QueueAction::Move { id, position }) => {
            call(client.move_experiment(pb::MoveExperimentRequest { id, position })).await?
        }
        Some(QueueAction::Hold { id, reason }) => {
            let e = call(client.hold_experiment(pb::HoldExperimentRequest { id, reason })).await?;
            return held_reply(&e, json);
        }
        Some(QueueAction::Release { id }) => {
            let e = call(client.release_experiment(pb::ReleaseExperimentRequest { id })).await?;
            return held_reply(&e, json);
        }
    };
    if json {
        out_json(&json::queue(&q))
    } else {
        out(&render::queue(&q))
    }
}

/// The reply to `queue hold` / `queue release`: the experiment.
fn held_reply(e: &pb::Experiment, json: bool) -> Result<()> {
    if json {
        return out_json(&json::experiment(e));
    }
    let held = if e.held { "held" } else { "not held" };
    out_line(&format!(
        "experiment {}: {}, {held}",
        e.id,
        render::experiment_state(e.state)
    ))
}

async fn transfers(ch: Channel, json: bool) -> Result<()> {
    let mut client = QueueServiceClient::new(ch);
    let reply = call(client.list_transfers(pb::ListTransfersRequest {})).await?;
    if json {
        return out_json(&serde_json::Value::Array(
            reply.transfers.iter().map(json::pending_transfer).collect(),
        ));
    }
    if reply.transfers.is_empty() {
        eprintln!("no transfers pending");
        return Ok(());
    }
    out(&render::transfer_table(&reply.transfers))
}

async fn confirm_transfer(ch: Channel, id: String, by: String, json: bool) -> Result<()> {
    let mut client = QueueServiceClient::new(ch);
    let t = call(client.confirm_transfer(pb::ConfirmTransferRequest {
        transfer_id: id,
        confirmed_by: by,
    }))
    .await?;
    if json {
        return out_json(&json::pending_transfer(&t));
    }
    out_line(&format!(
        "transfer {} confirmed: {}",
        t.id,
        render::transfer_move(&t)
    ))
}

async fn alarms(ch: Channel, device: Option<String>, json: bool) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let reply = call(client.list_alarms(pb::ListAlarmsRequest {
        device_id: device.unwrap_or_default(),
    }))
    .await?;
    if json {
        return out_json(&serde_json::Value::Array(
            reply.alarms.iter().map(json::active_alarm).collect(),
        ));
    }
    if reply.alarms.is_empty() {
        eprintln!("no alarms");
        return Ok(());
    }
    out(&render::alarm_table(&reply.alarms))
}

async fn acknowledge_alarm(
    ch: Channel,
    device: String,
    code: String,
    by: String,
    json: bool,
) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let a = call(client.acknowledge_alarm(pb::AcknowledgeAlarmRequest {
        device_id: device,
        code,
        acknowledged_by: by,
    }))
    .await?;
    if json {
        return out_json(&json::active_alarm(&a));
    }
    out_line(&render::alarm_line(&a))
}

async fn set_maintenance(
    ch: Channel,
    id: String,
    maintenance: bool,
    reason: String,
    json: bool,
) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let d = call(client.set_maintenance(pb::SetMaintenanceRequest {
        id,
        maintenance,
        reason,
    }))
    .await?;
    if json {
        out_json(&json::device(&d))
    } else {
        out(&render::device_detail(&d))
    }
}

async fn devices(ch: Channel, json: bool) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let reply = call(client.list_devices(pb::ListDevicesRequest {})).await?;
    if json {
        return out_json(&serde_json::Value::Array(
            reply.devices.iter().map(json::device).collect(),
        ));
    }
    if reply.devices.is_empty() {
        eprintln!("no devices configured");
        return Ok(());
    }
    out(&render::device_table(&reply.devices))
}

async fn device(ch: Channel, id: String, json: bool) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let d = call(client.get_device(pb::GetDeviceRequest { id })).await?;
    if json {
        out_json(&json::device(&d))
    } else {
        out(&render::device_detail(&d))
    }
}

/// Follows the event log, reconnecting and resuming after the last sequence printed.
async fn watch(ch: Channel, conn: &Conn, args: WatchArgs, json: bool) -> Result<()> {
    use std::io::IsTerminal;
    let mut client = EventServiceClient::new(ch);
    let from = if args.from_start { Some(0) } else { args.from };
    let filter = pb::StreamEventsRequest {
        from_sequence: from.unwrap_or(0),
        tail: from.is_none(),
        batch_id: args.batch.unwrap_or_default(),
        experiment_id: args.experiment.unwrap_or_default(),
        device_id: args.device.unwrap_or_default(),
        kinds: args.kinds,
    };
    let collapse = !json && io::stdout().is_terminal();
    let width = ratatui::crossterm::terminal::size()
        .ok()
        .map(|(columns, _)| usize::from(columns));
    let mut printer = watch::Printer::new(collapse, width);
    let emit = |event: &pb::Event| {
        let text = if json {
            format!("{}\n", json::event(event))
        } else {
            printer.event(event, &render::event_line(event))
        };
        out(&text)
    };
    let result = follow_events(
        &mut client,
        filter,
        Backoff::new(),
        emit,
        interrupted(),
        Some(conn),
    )
    .await;
    out(printer.finish())?;
    result
}

/// The core of `watch`: streams events after `request.from_sequence`, passing each to `emit`
/// once, in order. On a transient failure or a closed stream it waits (with `backoff`) and
/// resumes from the last sequence emitted, so nothing is missed or repeated. Returns `Ok` when
/// `stop` completes, `Err` on a permanent failure (e.g. INVALID_ARGUMENT) or if `emit` fails.
async fn follow_events(
    client: &mut EventServiceClient<Channel>,
    mut request: pb::StreamEventsRequest,
    mut backoff: Backoff,
    mut emit: impl FnMut(&pb::Event) -> Result<()>,
    stop: impl Future<Output = ()>,
    conn: Option<&Conn>,
) -> Result<()> {
    tokio::pin!(stop);
    let mut last_seen = request.from_sequence;
    let mut tail = request.tail;
    let mut ever_connected = false;
    let mut reconnecting = false;
    loop {
        request.from_sequence = last_seen;
        request.tail = tail;
        let session = async {
            let response = client.stream_events(request.clone()).await?;
            ever_connected = true;
            if tail {
                // Where the tail started: a reconnect resumes from there even if nothing
                // was printed yet, so no event is skipped.
                if let Some(after) = response
                    .metadata()
                    .get(STREAM_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                {
                    last_seen = after;
                }
                tail = false;
                eprintln!(
                    "watch: new events after sequence {last_seen} (--from-start replays the \
                     whole log; Ctrl-C stops)"
                );
            }
            let mut stream = response.into_inner();
            if reconnecting {
                eprintln!("watch: reconnected, resuming after sequence {last_seen}");
            }
            while let Some(event) = stream.message().await? {
                backoff.reset();
                // The server promises no duplicates; make sure of it anyway.
                if event.sequence <= last_seen {
                    continue;
                }
                last_seen = event.sequence;
                emit(&event).map_err(StreamEnd::Output)?;
            }
            Ok::<(), StreamEnd>(())
        };
        let why = tokio::select! {
            () = &mut stop => return Ok(()),
            result = session => match result {
                Ok(()) => "the daemon closed the stream".to_owned(),
                // Not a gRPC server at all: retrying will not make it one.
                Err(StreamEnd::Rpc(status)) if is_transient(status.code()) => {
                    // A peer that never answered in gRPC is not worth retrying.
                    if !ever_connected
                        && let Some(conn) = conn
                        && let Some(not) = not_grpc_endpoint(&status, conn).await
                    {
                        return Err(not.into());
                    }
                    format!("{}: {}", code_name(status.code()), status.message())
                }
                Err(StreamEnd::Rpc(status))
                    if reconnecting && status.code() == Code::OutOfRange =>
                {
                    return Err(Status::out_of_range(format!(
                        "{}; this watch already printed sequence {last_seen}, so the daemon \
                         it reconnected to keeps another event log (a new data directory?); \
                         start a new watch",
                        status.message()
                    ))
                    .into());
                }
                Err(StreamEnd::Rpc(status)) => return Err(status.into()),
                Err(StreamEnd::Output(err)) => return Err(err),
            },
        };
        reconnecting = true;
        let delay = backoff.next_delay();
        eprintln!(
            "watch: connection lost ({why}); reconnecting in {} and resuming after sequence {}",
            delay_text(delay),
            last_seen
        );
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Streams one device's live readings, reconnecting if the link drops.
async fn watch_device(ch: Channel, id: String, json: bool) -> Result<()> {
    let mut client = DeviceServiceClient::new(ch);
    let mut backoff = Backoff::new();
    let ctrl_c = interrupted();
    tokio::pin!(ctrl_c);
    loop {
        let session = async {
            let request = pb::WatchDeviceRequest { id: id.clone() };
            let mut stream = client.watch_device(request).await?.into_inner();
            while let Some(reading) = stream.message().await? {
                backoff.reset();
                let line = if json {
                    json::reading(&reading).to_string()
                } else {
                    render::reading_line(&reading)
                };
                out_line(&line).map_err(StreamEnd::Output)?;
            }
            Ok::<(), StreamEnd>(())
        };
        let why = tokio::select! {
            () = &mut ctrl_c => return Ok(()),
            result = session => match result {
                Ok(()) => "the daemon closed the stream".to_owned(),
                Err(StreamEnd::Rpc(status)) if not_grpc(&status).is_some() => {
                    return Err(status.into());
                }
                Err(StreamEnd::Rpc(status)) if is_transient(status.code()) => {
                    format!("{}: {}", code_name(status.code()), status.message())
                }
                Err(StreamEnd::Rpc(status)) => return Err(status.into()),
                Err(StreamEnd::Output(err)) => return Err(err),
            },
        };
        let delay = backoff.next_delay();
        eprintln!(
            "device --watch: connection lost ({why}); reconnecting in {} (readings in between \
             are not replayed; `ppuctl watch` shows the durable log)",
            delay_text(delay)
        );
        tokio::select! {
            () = &mut ctrl_c => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn delay_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        render::duration(d.as_secs_f64())
    }
}

/// Completes on Ctrl-C (SIGINT). If the handler cannot be installed, never completes, and
/// Ctrl-C keeps its default effect.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a streaming session ended with an error.
enum StreamEnd {
    /// The RPC failed: retried if transient.
    Rpc(Status),
    /// Writing to stdout failed: never retried.
    Output(anyhow::Error),
}

impl From<Status> for StreamEnd {
    fn from(status: Status) -> Self {
        StreamEnd::Rpc(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from([
            "ppuctl", "list", "--state", "running", "--label", "a=b", "--label", "c=d=e", "--all",
        ])
        .unwrap();
        let Command::List(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            args.labels,
            vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]
        );
        assert!(args.all);
        assert!(Cli::try_parse_from(["ppuctl", "list", "--label", "nokey"]).is_err());
        assert!(Cli::try_parse_from(["ppuctl", "list", "--limit", "0"]).is_err());

        let cli =
            Cli::try_parse_from(["ppuctl", "--json", "queue", "pause", "--reason", "x"]).unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Queue {
                action: Some(QueueAction::Pause { .. })
            }
        ));

        let cli = Cli::try_parse_from(["ppuctl", "device", "furnace-1", "--watch"]).unwrap();
        assert!(matches!(cli.command, Command::Device { watch: true, .. }));
    }

    #[test]
    fn parses_the_operator_commands() {
        let parse = |args: &[&str]| {
            let mut all = vec!["ppuctl"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|c| c.command)
        };
        assert!(matches!(
            parse(&["queue", "move", "E1", "3"]).unwrap(),
            Command::Queue { action: Some(QueueAction::Move { ref id, position: 3 }) } if id == "E1"
        ));
        assert!(parse(&["queue", "move", "E1", "-1"]).is_err());
        assert!(matches!(
            parse(&["queue", "hold", "E1", "--reason", "r"]).unwrap(),
            Command::Queue { action: Some(QueueAction::Hold { ref reason, .. }) } if reason == "r"
        ));
        assert!(matches!(
            parse(&["queue", "abort"]).unwrap(),
            Command::Queue {
                action: Some(QueueAction::Abort { .. })
            }
        ));
        assert!(matches!(
            parse(&["queue", "release", "E1"]).unwrap(),
            Command::Queue {
                action: Some(QueueAction::Release { .. })
            }
        ));
        assert!(matches!(
            parse(&["cancel", "E1", "--after-current-step"]).unwrap(),
            Command::Cancel {
                after_current_step: true,
                ..
            }
        ));
        assert!(matches!(
            parse(&["transfer", "confirm", "T1", "--by", "robot-2"]).unwrap(),
            Command::Transfer { action: TransferAction::Confirm { ref id, ref by } }
                if id == "T1" && by == "robot-2"
        ));
        assert!(matches!(
            parse(&["alarm", "ack", "furnace-1", "sensor_break", "--by", "alice"]).unwrap(),
            Command::Alarm { action: AlarmAction::Ack { ref device, ref code, ref by } }
                if device == "furnace-1" && code == "sensor_break" && by == "alice"
        ));
        assert!(matches!(
            parse(&["alarms", "--device", "furnace-1"]).unwrap(),
            Command::Alarms { device: Some(_) }
        ));
        assert!(matches!(
            parse(&[
                "device",
                "furnace-1",
                "--maintenance",
                "on",
                "--reason",
                "tc"
            ])
            .unwrap(),
            Command::Device {
                maintenance: Some(OnOff::On),
                reason: Some(_),
                watch: false,
                ..
            }
        ));
        assert!(parse(&["device", "furnace-1", "--maintenance", "maybe"]).is_err());
        assert!(parse(&["device", "furnace-1", "--reason", "no maintenance flag"]).is_err());
        assert!(parse(&["device", "furnace-1", "--watch", "--maintenance", "off"]).is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_for(Code::InvalidArgument), 2);
        assert_eq!(exit_code_for(Code::FailedPrecondition), 2);
        assert_eq!(exit_code_for(Code::AlreadyExists), 2);
        assert_eq!(exit_code_for(Code::NotFound), 2);
        assert_eq!(exit_code_for(Code::OutOfRange), 2);
        assert_eq!(exit_code_for(Code::Unavailable), 1);
        assert_eq!(exit_code_for(Code::Internal), 1);
        // A daemon that does not implement a request yet is not the caller's mistake.
        assert_eq!(exit_code_for(Code::Unimplemented), 1);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 250);
    }
}
