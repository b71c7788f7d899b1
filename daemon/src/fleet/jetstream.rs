//! The NATS connection and the fleet's JetStream objects, created idempotently by every lab
//! (the first one creates, the others find them).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectOptions, ServerAddr};

use crate::config::{FleetAuth, FleetSettings};

/// The stream of every lab's events and refusals.
pub const EVENTS_STREAM: &str = "PPU_EVENTS";
/// The work queue planners publish experiments to.
pub const WORK_STREAM: &str = "PPU_WORK";
/// The work stream's subjects: `ppu-work.<caps>`, under a root of their own (`ppu.work.>`
/// would overlap `ppu.*.events.>`, which nats-server refuses).
pub const WORK_SUBJECTS: &str = "ppu-work.>";
/// The prefix of a work subject, before its capabilities.
pub const WORK_PREFIX: &str = "ppu-work.";
/// Exactly-once claims of work messages: key = message id, value = lab id.
pub const CLAIMS_BUCKET: &str = "PPU_CLAIMS";
/// The lab registry: key = lab id, value = its heartbeat JSON.
pub const LABS_BUCKET: &str = "PPU_LABS";
/// JetStream's window for `Nats-Msg-Id` deduplication.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The JetStream objects the tasks use.
#[derive(Clone)]
pub struct Objects {
    pub work: stream::Stream,
    pub claims: kv::Store,
    pub labs: kv::Store,
}

/// Connects with the settings' credentials and TLS. Returns at once with a client that keeps
/// (re)connecting in the background, so the lab starts while NATS is down.
pub async fn connect(settings: &FleetSettings) -> Result<Client, String> {
    let mut opts = ConnectOptions::new()
        .name(format!("ppud {}", settings.lab))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5));
    let addrs = settings
        .servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| format!("fleet.servers: {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match &settings.auth {
        FleetAuth::None => {
            // Credentials in a server URL (`nats://user:pass@host:4222`, as `ppud dev --fleet`
            // takes them): async-nats sends only those of ConnectOptions, so lift them there.
            // A user without a password is a token (`nats://TOKEN@host`).
            if let Some(a) = addrs.iter().find(|a| a.username().is_some()) {
                let user = a.username().unwrap_or_default().to_owned();
                opts = match a.password() {
                    Some(pass) => opts.user_and_password(user, pass.to_owned()),
                    None => opts.token(user),
                };
            }
        }
        FleetAuth::UserPassword { user, password } => {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        FleetAuth::NkeySeedFile(path) => {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("fleet.nkey_seed_file {}: {e}", path.display()))?;
            opts = opts.nkey(seed.trim().to_owned());
        }
        FleetAuth::CredsFile(path) => {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| format!("fleet.creds_file {}: {e}", path.display()))?;
        }
    }
    if let Some(tls) = &settings.tls {
        opts = opts.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &tls.client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
    }
    opts.connect(addrs).await.map_err(|e| e.to_string())
}

/// Creates the streams and buckets that do not exist yet (with the settings' replicas) and
/// returns handles on them.
pub async fn ensure_objects(
    js: &jetstream::Context,
    settings: &FleetSettings,
) -> Result<Objects, String> {
    js.get_or_create_stream(stream::Config {
        name: EVENTS_STREAM.to_owned(),
        subjects: vec!["ppu.*.events.>".to_owned(), "ppu.*.refused".to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: settings.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("stream {EVENTS_STREAM}: {e}"))?;
    let work = js
        .get_or_create_stream(stream::Config {
            name: WORK_STREAM.to_owned(),
            subjects: vec![WORK_SUBJECTS.to_owned()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: settings.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {WORK_STREAM}: {e}"))?;
    let claims = bucket(
        js,
        kv::Config {
            bucket: CLAIMS_BUCKET.to_owned(),
            description: "ppu fleet: which lab took each work message".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    let labs = bucket(
        js,
        kv::Config {
            bucket: LABS_BUCKET.to_owned(),
            description: "ppu fleet: lab registry (heartbeats)".to_owned(),
            history: 1,
            max_age: settings.heartbeat * 3,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok(Objects { work, claims, labs })
}

/// The bucket if it exists, else a new one with `config`. The bucket's stream is created
/// here, as the KV convention has it (`KV_<bucket>` on `$KV.<bucket>.>`, one message per key
/// up to `history`, rollups allowed, deletes denied, direct gets, discard new), because the
/// client's own `create_key_value` first reads the account info, whose reply from a 2.9
/// server (Debian's) it cannot parse.
async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, String> {
    let name = config.bucket.clone();
    if let Ok(kv) = js.get_key_value(&name).await {
        return Ok(kv);
    }
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{name}"),
            description: Some(config.description),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: config.history.max(1),
            max_age: config.max_age,
            storage: config.storage,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: config.num_replicas.max(1),
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    match js.get_key_value(&name).await {
        Ok(kv) => Ok(kv),
        // Another lab may have created it meanwhile; else report why the create failed.
        Err(e) => Err(match created {
            Err(c) => format!("bucket {name}: {c}"),
            Ok(_) => format!("bucket {name}: {e}"),
        }),
    }
}
