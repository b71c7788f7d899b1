//! Security of the gRPC surface against a real daemon (in-process, one simulated furnace behind
//! Modbus TCP): the role × RPC matrix, refused credentials, the planner's own-batch rule, the
//! audit trail, TLS and mutual TLS with certificates made here (rcgen), the listening rules,
//! the limits, and the local Unix socket with peer credentials.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pb::device_service_client::DeviceServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_daemon::app::{Daemon, LocalSocket, Security, StartError, TlsPem};
use ppu_daemon::auth::{Authenticator, Mode, Role, Tokens};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::server::Limits;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

const DEADLINE: Duration = Duration::from_secs(30);

const VIEWER: &str = "ppu_viewer-token";
const PLANNER: &str = "ppu_planner-token";
const PLANNER2: &str = "ppu_other-planner-token";
const TECHNICIAN: &str = "ppu_technician-token";
const ADMIN: &str = "ppu_admin-token";

fn tokens() -> Tokens {
    Tokens::from_plain([
        (VIEWER, "dash", Role::Viewer),
        (PLANNER, "gp-planner", Role::Planner),
        (PLANNER2, "other-planner", Role::Planner),
        (TECHNICIAN, "tech-ana", Role::Technician),
        (ADMIN, "root-admin", Role::Admin),
    ])
}

fn secured() -> Security {
    Security {
        auth: Authenticator {
            mode: Mode::Tokens(tokens()),
            ..Authenticator::default()
        },
        ..Security::default()
    }
}

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    async fn start(dir: &Path, security: Security) -> Result<Lab, StartError> {
        let devlab = DevLab::start(Clock::new(2000.0), 1)
            .await
            .expect("simulated furnace");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let daemon = devlab
            .start_secured_daemon(
                "127.0.0.1:0".parse().expect("addr"),
                dir,
                poll,
                &Policies::default(),
                security,
            )
            .await?;
        Ok(Lab { daemon, devlab })
    }

    fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.daemon.addr()))
            .expect("url")
            .connect_lazy()
    }

    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.daemon.shutdown())
            .await
            .expect("shutdown within the deadline");
        self.devlab.shutdown().await;
    }
}

fn req<T>(msg: T, auth: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(value) = auth {
        r.metadata_mut()
            .insert("authorization", value.parse().expect("ascii header"));
    }
    r
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every RPC of the daemon, health and reflection included.
const RPCS: &[&str] = &[
    "SubmitBatch",
    "GetBatch",
    "GetExperiment",
    "ListExperiments",
    "CancelExperiment",
    "GetQueue",
    "PauseQueue",
    "ResumeQueue",
    "AbortQueue",
    "MoveExperiment",
    "HoldExperiment",
    "ReleaseExperiment",
    "ListTransfers",
    "ConfirmTransfer",
    "StreamEvents",
    "ListDevices",
    "GetDevice",
    "WatchDevice",
    "SetMaintenance",
    "ListAlarms",
    "AcknowledgeAlarm",
    "GetSchema",
    "Health.Check",
    "Health.Watch",
    "Reflection",
    "Reflection.v1alpha",
];

/// The specification: which roles (v, p, t, a) may call each RPC.
fn allowed(rpc: &str) -> &'static str {
    match rpc {
        "SubmitBatch" => "pa",
        "CancelExperiment" => "pta",
        "PauseQueue" | "ResumeQueue" | "AbortQueue" | "MoveExperiment" | "HoldExperiment"
        | "ReleaseExperiment" | "ConfirmTransfer" | "SetMaintenance" | "AcknowledgeAlarm" => "ta",
        _ => "vpta",
    }
}

/// Makes one call of `rpc` with harmless arguments (unknown ids and the like): what matters is
/// whether the daemon lets it reach the handler.
async fn call(ch: &Channel, rpc: &str, auth: Option<&str>) -> Result<(), Status> {
    let mut ex = ExperimentServiceClient::new(ch.clone());
    let mut q = QueueServiceClient::new(ch.clone());
    let mut ev = EventServiceClient::new(ch.clone());
    let mut dev = DeviceServiceClient::new(ch.clone());
    let id = || "nope".to_owned();
    match rpc {
        "SubmitBatch" => ex
            .submit_batch(req(
                pb::SubmitBatchRequest {
                    idempotency_key: "matrix".into(),
                    experiments: vec![],
                },
                auth,
            ))
            .await
            .map(drop),
        "GetBatch" => ex
            .get_batch(req(pb::GetBatchRequest { id: id() }, auth))
            .await
            .map(drop),
        "GetExperiment" => ex
            .get_experiment(req(pb::GetExperimentRequest { id: id() }, auth))
            .await
            .map(drop),
        "ListExperiments" => ex
            .list_experiments(req(pb::ListExperimentsRequest::default(), auth))
            .await
            .map(drop),
        "CancelExperiment" => ex
            .cancel_experiment(req(
                pb::CancelExperimentRequest {
                    id: id(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "GetQueue" => q
            .get_queue(req(pb::GetQueueRequest::default(), auth))
            .await
            .map(drop),
        "PauseQueue" => q
            .pause_queue(req(pb::PauseQueueRequest::default(), auth))
            .await
            .map(drop),
        "ResumeQueue" => q
            .resume_queue(req(pb::ResumeQueueRequest::default(), auth))
            .await
            .map(drop),
        "AbortQueue" => q
            .abort_queue(req(pb::AbortQueueRequest::default(), auth))
            .await
            .map(drop),
        "MoveExperiment" => q
            .move_experiment(req(
                pb::MoveExperimentRequest {
                    id: id(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "HoldExperiment" => q
            .hold_experiment(req(
                pb::HoldExperimentRequest {
                    id: id(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "ReleaseExperiment" => q
            .release_experiment(req(pb::ReleaseExperimentRequest { id: id() }, auth))
            .await
            .map(drop),
        "ListTransfers" => q
            .list_transfers(req(pb::ListTransfersRequest::default(), auth))
            .await
            .map(drop),
        "ConfirmTransfer" => q
            .confirm_transfer(req(
                pb::ConfirmTransferRequest {
                    transfer_id: id(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "StreamEvents" => ev
            .stream_events(req(pb::StreamEventsRequest::default(), auth))
            .await
            .map(drop),
        "ListDevices" => dev
            .list_devices(req(pb::ListDevicesRequest::default(), auth))
            .await
            .map(drop),
        "GetDevice" => dev
            .get_device(req(pb::GetDeviceRequest { id: id() }, auth))
            .await
            .map(drop),
        "WatchDevice" => dev
            .watch_device(req(
                pb::WatchDeviceRequest {
                    id: "furnace-1".into(),
                },
                auth,
            ))
            .await
            .map(drop),
        "SetMaintenance" => dev
            .set_maintenance(req(
                pb::SetMaintenanceRequest {
                    id: id(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "ListAlarms" => dev
            .list_alarms(req(pb::ListAlarmsRequest::default(), auth))
            .await
            .map(drop),
        "AcknowledgeAlarm" => dev
            .acknowledge_alarm(req(
                pb::AcknowledgeAlarmRequest {
                    device_id: id(),
                    code: "x".into(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        "GetSchema" => dev
            .get_schema(req(pb::GetSchemaRequest {}, auth))
            .await
            .map(drop),
        "Health.Check" => HealthClient::new(ch.clone())
            .check(req(tonic_health::pb::HealthCheckRequest::default(), auth))
            .await
            .map(drop),
        "Health.Watch" => HealthClient::new(ch.clone())
            .watch(req(tonic_health::pb::HealthCheckRequest::default(), auth))
            .await
            .map(drop),
        "Reflection" => {
            use tonic_reflection::pb::v1::ServerReflectionRequest;
            use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
            let first = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut replies = ServerReflectionClient::new(ch.clone())
                .server_reflection_info(req(tokio_stream::iter(vec![first]), auth))
                .await?
                .into_inner();
            replies.message().await.map(drop)
        }
        // Older grpcurl, grpcui, Postman and grpc-python's reflection client ask v1alpha.
        "Reflection.v1alpha" => {
            use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
            use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
            let first = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut replies = ServerReflectionClient::new(ch.clone())
                .server_reflection_info(req(tokio_stream::iter(vec![first]), auth))
                .await?
                .into_inner();
            replies.message().await.map(drop)
        }
        other => panic!("unknown rpc {other}"),
    }
}

fn is_refusal(code: Code) -> bool {
    matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

#[tokio::test]
async fn role_by_rpc_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), secured()).await.expect("starts");
    let ch = lab.channel();
    let mut table = String::new();
    let mut wrong = Vec::new();
    for rpc in RPCS {
        table.push_str(&format!("{rpc:<18}"));
        for (letter, token) in [
            ('v', VIEWER),
            ('p', PLANNER),
            ('t', TECHNICIAN),
            ('a', ADMIN),
        ] {
            let expect = allowed(rpc).contains(letter);
            let got = call(&ch, rpc, Some(&bearer(token))).await;
            let code = got.as_ref().err().map(Status::code).unwrap_or(Code::Ok);
            table.push_str(&format!(" {letter}:{code:?}"));
            let ok = if expect {
                !is_refusal(code)
            } else {
                code == Code::PermissionDenied
            };
            if !ok {
                wrong.push(format!(
                    "{rpc} as {letter}: expected allowed={expect}, got {got:?}"
                ));
            }
        }
        table.push('\n');
    }
    assert!(wrong.is_empty(), "{}\n\n{table}", wrong.join("\n"));
    lab.stop().await;
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_are_unauthenticated_and_leak_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), secured()).await.expect("starts");
    let ch = lab.channel();
    let unknown = "ppu_0123456789abcdef-not-a-token";
    let cases: [(&str, Option<String>); 6] = [
        ("missing", None),
        ("not bearer", Some(format!("Basic {unknown}"))),
        ("no token", Some("Bearer".to_owned())),
        ("two words", Some(format!("Bearer {unknown} extra"))),
        ("unknown", Some(bearer(unknown))),
        (
            "a hash instead of a token",
            Some(bearer(&ppu_daemon::auth::hex(
                &ppu_daemon::auth::hash_token(VIEWER),
            ))),
        ),
    ];
    let mut messages = std::collections::BTreeSet::new();
    for rpc in RPCS {
        for (name, auth) in &cases {
            let err = call(&ch, rpc, auth.as_deref())
                .await
                .expect_err("refused without a valid token");
            assert_eq!(
                err.code(),
                Code::Unauthenticated,
                "{rpc} with {name}: {err:?}"
            );
            assert!(!err.message().contains(unknown), "{rpc}: echoes the token");
            messages.insert(err.message().to_owned());
        }
    }
    // One message for every case: it tells nothing about which tokens or principals exist.
    assert_eq!(messages.len(), 1, "{messages:?}");
    lab.stop().await;
}

#[tokio::test]
async fn health_and_reflection_can_be_left_open_by_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut security = secured();
    security.auth.protect_health = false;
    security.auth.protect_reflection = false;
    let lab = Lab::start(dir.path(), security).await.expect("starts");
    let ch = lab.channel();
    call(&ch, "Health.Check", None).await.expect("health open");
    call(&ch, "Reflection", None)
        .await
        .expect("reflection open");
    call(&ch, "Reflection.v1alpha", None)
        .await
        .expect("reflection v1alpha open");
    let err = call(&ch, "GetQueue", None)
        .await
        .expect_err("api protected");
    assert_eq!(err.code(), Code::Unauthenticated);
    lab.stop().await;
}

fn furnace_spec(name: &str) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![pb::FurnaceSegment {
                    kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                        duration_s: 36_000.0,
                    })),
                }],
            })),
        }],
        ..Default::default()
    }
}

async fn submit(ch: &Channel, token: &str, key: &str, n: usize) -> Result<pb::Batch, Status> {
    ExperimentServiceClient::new(ch.clone())
        .submit_batch(req(
            pb::SubmitBatchRequest {
                idempotency_key: key.into(),
                experiments: (0..n)
                    .map(|i| furnace_spec(&format!("{key}-{i}")))
                    .collect(),
            },
            Some(&bearer(token)),
        ))
        .await
        .map(|r| r.into_inner().batch.expect("batch"))
}

/// Reads the event stream until `want` holds of what was read, within [`DEADLINE`].
async fn events_until(ch: &Channel, want: impl Fn(&[pb::Event]) -> bool) -> Vec<pb::Event> {
    let mut s = EventServiceClient::new(ch.clone())
        .stream_events(req(
            pb::StreamEventsRequest::default(),
            Some(&bearer(VIEWER)),
        ))
        .await
        .expect("stream")
        .into_inner();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut out = Vec::new();
    while !want(&out) {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(e))) => out.push(e),
            other => panic!("stream ended before the expected events: {other:?} after {out:?}"),
        }
    }
    out
}

fn audits(events: &[pb::Event]) -> Vec<&pb::AuditRecord> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::Audit(a)) => Some(a),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn planners_cancel_only_their_own_and_every_mutation_is_audited_with_its_principal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), secured()).await.expect("starts");
    let ch = lab.channel();
    let mine = submit(&ch, PLANNER, "mine", 1)
        .await
        .expect("planner submits");
    assert_eq!(mine.submitted_by, "gp-planner");
    let theirs = submit(&ch, PLANNER2, "theirs", 1)
        .await
        .expect("other planner submits");
    let mut ex = ExperimentServiceClient::new(ch.clone());
    let cancel = |id: &str, token: &str| {
        req(
            pb::CancelExperimentRequest {
                id: id.to_owned(),
                reason: "test".into(),
                ..Default::default()
            },
            Some(&bearer(token)),
        )
    };
    let denied = ex
        .cancel_experiment(cancel(&theirs.experiment_ids[0], PLANNER))
        .await
        .expect_err("not its batch");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let theirs_now = ex
        .get_experiment(req(
            pb::GetExperimentRequest {
                id: theirs.experiment_ids[0].clone(),
            },
            Some(&bearer(VIEWER)),
        ))
        .await
        .expect("get")
        .into_inner();
    assert_ne!(
        theirs_now.state,
        pb::ExperimentState::Cancelled as i32,
        "nothing changed"
    );
    ex.cancel_experiment(cancel(&mine.experiment_ids[0], PLANNER))
        .await
        .expect("own experiment");
    ex.cancel_experiment(cancel(&theirs.experiment_ids[0], TECHNICIAN))
        .await
        .expect("a technician cancels any");
    let reply = QueueServiceClient::new(ch.clone())
        .pause_queue(req(
            pb::PauseQueueRequest::default(),
            Some(&bearer(TECHNICIAN)),
        ))
        .await
        .expect("technician pauses");
    let request_id = reply
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("reply carries its request id")
        .to_owned();
    let viewer_try = QueueServiceClient::new(ch.clone())
        .resume_queue(req(
            pb::ResumeQueueRequest::default(),
            Some(&bearer(VIEWER)),
        ))
        .await
        .expect_err("viewer may not resume");
    assert_eq!(viewer_try.code(), Code::PermissionDenied);

    let events = events_until(&ch, |evs| {
        audits(evs)
            .iter()
            .any(|a| a.method.ends_with("/ResumeQueue"))
    })
    .await;
    let records = audits(&events);
    let find = |method: &str, principal: &str, code: &str| {
        records
            .iter()
            .find(|a| a.method.ends_with(method) && a.principal == principal && a.code == code)
    };
    let sub = find("/SubmitBatch", "gp-planner", "OK").expect("submission audited");
    assert_eq!(sub.role, "planner");
    assert_eq!(sub.target, mine.id);
    assert_eq!(sub.transport, "tcp");
    // One record per submission (committed with the batch, not written again by the layer),
    // filed on the batch.
    let submits: Vec<&pb::Event> = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(pb::event::Kind::Audit(a)) if a.method.ends_with("/SubmitBatch") && a.target == mine.id))
        .collect();
    assert_eq!(submits.len(), 1);
    assert_eq!(submits[0].batch_id, mine.id);
    let refused = find("/CancelExperiment", "gp-planner", "PERMISSION_DENIED")
        .expect("refused cancel audited");
    assert_eq!(refused.target, theirs.experiment_ids[0]);
    find("/CancelExperiment", "gp-planner", "OK").expect("own cancel audited");
    find("/CancelExperiment", "tech-ana", "OK").expect("technician cancel audited");
    let pause = find("/PauseQueue", "tech-ana", "OK").expect("pause audited");
    assert_eq!(pause.request_id, request_id);
    find("/ResumeQueue", "dash", "PERMISSION_DENIED").expect("viewer attempt audited");
    // Reads are not audited.
    assert!(!records.iter().any(|a| a.method.ends_with("/GetExperiment")));
    // The audit record of a cancel is on the experiment's own stream too.
    let audit_event = events
        .iter()
        .find(|e| matches!(&e.kind, Some(pb::event::Kind::Audit(a)) if a.principal == "tech-ana" && a.method.ends_with("/CancelExperiment")))
        .expect("event");
    assert_eq!(audit_event.experiment_id, theirs.experiment_ids[0]);
    lab.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Listening rules, TLS and mTLS.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_non_loopback_bind_without_tls_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let devlab = DevLab::start(Clock::new(2000.0), 0).await.expect("lab");
    let poll = PollSettings {
        poll_interval: Duration::from_millis(100),
        reading_log_interval: Duration::from_secs(1),
    };
    let listen: SocketAddr = "0.0.0.0:0".parse().expect("addr");
    let err = devlab
        .start_secured_daemon(listen, dir.path(), poll, &Policies::default(), secured())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, StartError::Refused(_)), "{msg}");
    for needle in ["not a loopback address", "[tls]", "--insecure-plaintext"] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    // Nothing was created: the check runs before the store is opened.
    assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none());
    // An open daemon is refused off loopback even with the plain-text opt-in.
    let open = Security {
        insecure_plaintext: true,
        ..Security::default()
    };
    let err = devlab
        .start_secured_daemon(listen, dir.path(), poll, &Policies::default(), open)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("authentication is off"), "{err}");
    devlab.shutdown().await;
}

#[tokio::test]
async fn a_bad_certificate_fails_the_start_cleanly_and_the_data_dir_can_be_reopened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut security = secured();
    security.tls = Some(TlsPem {
        cert: b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec(),
        key: b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n".to_vec(),
        client_ca: None,
    });
    let err = Lab::start(dir.path(), security)
        .await
        .err()
        .expect("a bad certificate is refused");
    assert!(matches!(err, StartError::Tls(_)), "{err}");
    // Nothing of the failed start still holds the store: the same data dir opens at once.
    let lab = Lab::start(dir.path(), secured())
        .await
        .expect("restarts on the same data dir");
    lab.stop().await;
}

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

/// A CA with a server certificate for localhost/127.0.0.1 and a client certificate.
fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} client"));
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client cert");
    Pki {
        ca_pem: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_encrypted_and_plain_text_clients_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki("server");
    let mut security = secured();
    security.tls = Some(TlsPem {
        cert: p.server_cert.clone().into_bytes(),
        key: p.server_key.clone().into_bytes(),
        client_ca: None,
    });
    let lab = Lab::start(dir.path(), security).await.expect("starts");
    let addr = lab.daemon.addr();
    let ch = tls_channel(addr, &p.ca_pem, None)
        .await
        .expect("TLS connects");
    call(&ch, "GetQueue", Some(&bearer(VIEWER)))
        .await
        .expect("a call over TLS");
    let plain = call(&lab.channel(), "GetQueue", Some(&bearer(VIEWER))).await;
    assert!(plain.is_err(), "plain text to a TLS port must fail");
    let other = pki("impostor");
    assert!(
        tls_channel(addr, &other.ca_pem, None).await.is_err(),
        "a client that trusts another CA refuses the server"
    );
    lab.stop().await;
}

#[tokio::test]
async fn mtls_admits_clients_of_its_ca_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki("lab");
    let rogue = pki("rogue");
    let mut security = secured();
    security.tls = Some(TlsPem {
        cert: p.server_cert.clone().into_bytes(),
        key: p.server_key.clone().into_bytes(),
        client_ca: Some(p.ca_pem.clone().into_bytes()),
    });
    let lab = Lab::start(dir.path(), security).await.expect("starts");
    let addr = lab.daemon.addr();

    let good = tls_channel(addr, &p.ca_pem, Some((&p.client_cert, &p.client_key)))
        .await
        .expect("a client of the CA connects");
    call(&good, "PauseQueue", Some(&bearer(TECHNICIAN)))
        .await
        .expect("call over mTLS");
    // A valid mTLS connection still needs a token.
    let err = call(&good, "GetQueue", None).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // A client certificate from another CA, or none, never gets a call through (the
    // handshake fails, either at connect or on the first request).
    for (name, identity) in [
        (
            "wrong CA",
            Some((rogue.client_cert.as_str(), rogue.client_key.as_str())),
        ),
        ("no certificate", None),
    ] {
        let outcome = match tls_channel(addr, &p.ca_pem, identity).await {
            Err(_) => Err(Code::Unavailable),
            Ok(ch) => call(&ch, "GetQueue", Some(&bearer(ADMIN)))
                .await
                .map_err(|s| s.code()),
        };
        assert!(outcome.is_err(), "{name}: must be refused");
    }
    let events = events_until(&good, |evs| {
        audits(evs)
            .iter()
            .any(|a| a.method.ends_with("/PauseQueue"))
    })
    .await;
    let pause = audits(&events)
        .into_iter()
        .find(|a| a.method.ends_with("/PauseQueue"))
        .cloned()
        .expect("audited");
    assert_eq!(pause.transport, "mtls");
    assert_eq!(pause.principal, "tech-ana");
    lab.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------------------------

async fn healthy(ch: &Channel) {
    let reply = HealthClient::new(ch.clone())
        .check(req(
            tonic_health::pb::HealthCheckRequest::default(),
            Some(&bearer(VIEWER)),
        ))
        .await
        .expect("health check answers")
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn limits_refuse_oversized_batches_messages_bursts_and_streams_and_the_daemon_stays_healthy()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let mut security = secured();
    security.limits = Limits {
        max_batch_experiments: 3,
        max_message_bytes: 64 * 1024,
        submit_per_minute: 4,
        max_streams: 2,
        ..Limits::default()
    };
    let lab = Lab::start(dir.path(), security).await.expect("starts");
    let ch = lab.channel();

    let err = submit(&ch, PLANNER, "too-many", 4)
        .await
        .expect_err("4 > 3");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("experiments:"), "{err:?}");

    let mut big = furnace_spec("big");
    big.labels.insert("blob".into(), "x".repeat(100 * 1024));
    let err = ExperimentServiceClient::new(ch.clone())
        .submit_batch(req(
            pb::SubmitBatchRequest {
                idempotency_key: "big".into(),
                experiments: vec![big],
            },
            Some(&bearer(PLANNER)),
        ))
        .await
        .expect_err("message too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    healthy(&ch).await;

    // Refused calls cost nothing (the batch check runs before the rate limit, the oversized
    // message never reached the handler): four succeed, then the bucket (4 per minute) is
    // empty. Another principal is unaffected.
    submit(&ch, PLANNER, "ok-0", 1)
        .await
        .expect("within the rate");
    submit(&ch, PLANNER, "ok-1", 1)
        .await
        .expect("within the rate");
    submit(&ch, PLANNER, "ok-2", 1)
        .await
        .expect("within the rate");
    submit(&ch, PLANNER, "ok-3", 1)
        .await
        .expect("within the rate");
    let err = submit(&ch, PLANNER, "burst", 1)
        .await
        .expect_err("rate limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate limit"), "{err:?}");
    submit(&ch, ADMIN, "admin-1", 1)
        .await
        .expect("per principal");

    let mut ev = EventServiceClient::new(ch.clone());
    let open = |token: &str| req(pb::StreamEventsRequest::default(), Some(&bearer(token)));
    let s1 = ev.stream_events(open(VIEWER)).await.expect("stream 1");
    let s2 = ev.stream_events(open(VIEWER)).await.expect("stream 2");
    let err = ev
        .stream_events(open(VIEWER))
        .await
        .expect_err("third stream");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    healthy(&ch).await;
    drop((s1, s2));
    // A closed stream frees its slot (the server notices the client went away).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match ev.stream_events(open(VIEWER)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "slots never freed");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    healthy(&ch).await;
    lab.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The local socket.
// ---------------------------------------------------------------------------------------------

async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower_service_fn(move || {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connects over the socket")
}

/// A connector from a closure (what `tower::service_fn` would give, without the dependency).
fn tower_service_fn<F, Fut, T>(f: F) -> Connector<F>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    Connector(f)
}

#[derive(Clone)]
struct Connector<F>(F);

impl<F, Fut, T> tower_service::Service<tonic::codegen::http::Uri> for Connector<F>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Fut {
        (self.0)()
    }
}

#[tokio::test]
async fn the_local_socket_admits_peers_by_credentials_with_file_mode_0660() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ppud.sock");
    let mut security = secured();
    security.local = Some(LocalSocket {
        path: socket.clone(),
        mode: 0o660,
        role: Role::Viewer,
        allowed_uids: vec![],
    });
    let lab = Lab::start(&dir.path().join("data"), security)
        .await
        .expect("starts");
    let meta = std::fs::metadata(&socket).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let ch = unix_channel(&socket).await;
    // This test process runs as the daemon's own user: an admin without any token.
    call(&ch, "PauseQueue", None)
        .await
        .expect("own uid is admin over the socket");
    // A token sent over the socket wins over the peer credentials.
    let err = call(&ch, "ResumeQueue", Some(&bearer(VIEWER)))
        .await
        .expect_err("viewer token");
    assert_eq!(err.code(), Code::PermissionDenied);
    // TCP without a token is still refused.
    let err = call(&lab.channel(), "GetQueue", None)
        .await
        .expect_err("tcp needs a token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let uid = meta.uid();
    let events = events_until(&ch, |evs| {
        audits(evs)
            .iter()
            .any(|a| a.method.ends_with("/PauseQueue"))
    })
    .await;
    let pause = audits(&events)
        .into_iter()
        .find(|a| a.method.ends_with("/PauseQueue"))
        .cloned()
        .expect("audited");
    assert_eq!(pause.principal, format!("uid:{uid}"));
    assert_eq!(pause.transport, "unix");
    lab.stop().await;
    assert!(!socket.exists(), "the socket is removed at shutdown");
}
