//! ppud as a SiLA 2 server, against a real daemon (in-process, one simulated furnace behind
//! Modbus TCP) and a gRPC client that knows only what the server tells it: the feature
//! definitions it reads with GetFeatureDefinition, turned into descriptors by `ppu-sila`'s Part B
//! mapping, and dynamic messages. A furnace program runs as an observable command to its end,
//! a refusal names the parameter, tokens and roles are ppu.v1's, and the experiment a command
//! became is visible over ppu.v1 with its audit record.

use std::path::Path;
use std::time::Duration;

use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_daemon::app::{Daemon, Security, StartError};
use ppu_daemon::auth::{Authenticator, Mode, Role, Tokens};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::security::SilaSettings;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_schema::prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use ppu_sila::error::{FrameworkErrorKind, SilaError};
use ppu_sila::fdl::Feature;
use ppu_sila::value::{self, Value};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const DEADLINE: Duration = Duration::from_secs(60);

const VIEWER: &str = "ppu_viewer-token";
const PLANNER: &str = "ppu_planner-token";

const SILA_SERVICE: &str = "/sila2.org.silastandard.core.silaservice.v1.SiLAService";
const FURNACE: &str = "/sila2.ppu.devices.furnace.v1.Furnace";
const ACCESS_TOKEN_HEADER: &str =
    "sila-org.silastandard-core-authorizationservice-v1-metadata-accesstoken-bin";

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    async fn start(dir: &Path, security: Security) -> Result<Lab, StartError> {
        let devlab = DevLab::start(Clock::new(2000.0), 1)
            .await
            .expect("simulated furnace");
        let daemon = Self::daemon(&devlab, dir, security).await?;
        Ok(Lab { daemon, devlab })
    }

    async fn daemon(devlab: &DevLab, dir: &Path, security: Security) -> Result<Daemon, StartError> {
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let security = Security {
            sila: Some(SilaSettings::at("127.0.0.1:0".parse().expect("addr"))),
            ..security
        };
        devlab
            .start_secured_daemon(
                "127.0.0.1:0".parse().expect("addr"),
                dir,
                poll,
                &Policies::default(),
                security,
            )
            .await
    }

    fn sila(&self) -> Channel {
        let addr = self.daemon.sila_addr().expect("SiLA is served");
        Endpoint::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect_lazy()
    }

    fn v1(&self) -> Channel {
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

fn secured() -> Security {
    Security {
        auth: Authenticator {
            mode: Mode::Tokens(Tokens::from_plain([
                (VIEWER, "dash", Role::Viewer),
                (PLANNER, "gp-planner", Role::Planner),
            ])),
            ..Authenticator::default()
        },
        ..Security::default()
    }
}

/// How a call carries its token.
#[derive(Clone, Copy)]
enum Token<'a> {
    None,
    Bearer(&'a str),
    /// SiLA's AccessToken metadata: a serialized `Metadata_AccessToken`.
    Metadata(&'a str),
}

/// A codec of dynamic messages: requests encoded as they are, replies decoded as `output`.
struct DynCodec(MessageDescriptor);

struct DynEncoder;
struct DynDecoder(MessageDescriptor);

impl Codec for DynCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynEncoder;
    type Decoder = DynDecoder;
    fn encoder(&mut self) -> DynEncoder {
        DynEncoder
    }
    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.0.clone())
    }
}

impl Encoder for DynEncoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.encode_to_vec());
        Ok(())
    }
}

impl Decoder for DynDecoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A SiLA client that learns the server's features from the server.
struct Client {
    channel: Channel,
    pool: DescriptorPool,
    features: Vec<Feature>,
}

impl Client {
    /// Reads ImplementedFeatures and every feature definition (with `token`).
    async fn connect(channel: Channel, token: Token<'_>) -> Client {
        // The SiLAService feature alone, to ask for the others.
        let bootstrap = Client {
            channel: channel.clone(),
            pool: ppu_sila::descriptor::pool(&[]).expect("framework pool"),
            features: Vec::new(),
        };
        let service_xml = bootstrap
            .raw_definition(token, "org.silastandard/core/SiLAService/v1")
            .await;
        let service = Feature::from_xml(&service_xml).expect("SiLAService FDL reads");
        let mut client = Client {
            channel,
            pool: ppu_sila::descriptor::pool(std::slice::from_ref(&service)).expect("pool"),
            features: vec![service],
        };
        let ids = client
            .unary(token, SILA_SERVICE, "Get_ImplementedFeatures", Vec::new())
            .await
            .expect("ImplementedFeatures");
        let Value::List(ids) = field(&ids, "ImplementedFeatures") else {
            panic!("ImplementedFeatures is a list");
        };
        let mut features = Vec::new();
        for id in ids {
            let Value::String(id) = id else {
                panic!("identifiers are strings")
            };
            let xml = client.definition(token, &id).await.expect("definition");
            let f = Feature::from_xml(&xml).expect("every definition reads");
            assert_eq!(f.fully_qualified_identifier(), id);
            features.push(f);
        }
        client.pool = ppu_sila::descriptor::pool(&features).expect("pool of every feature");
        client.features = features;
        client
    }

    /// GetFeatureDefinition through the framework's messages alone (before any pool).
    async fn raw_definition(&self, token: Token<'_>, id: &str) -> String {
        // GetFeatureDefinition_Parameters { String FeatureIdentifier = 1 } and
        // GetFeatureDefinition_Responses { String FeatureDefinition = 1 }, by hand.
        let text = ppu_sila::framework::String { value: id.into() };
        let mut params = Vec::new();
        prost::encoding::message::encode(1, &text, &mut params);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("ready");
        let reply: tonic::Response<Vec<u8>> = grpc
            .unary(
                request(params, token),
                format!("{SILA_SERVICE}/GetFeatureDefinition")
                    .parse()
                    .expect("path"),
                RawCodec,
            )
            .await
            .expect("GetFeatureDefinition");
        #[derive(Clone, PartialEq, prost::Message)]
        struct Responses {
            #[prost(message, optional, tag = "1")]
            definition: Option<ppu_sila::framework::String>,
        }
        Responses::decode(reply.into_inner().as_slice())
            .expect("responses")
            .definition
            .expect("definition")
            .value
    }

    async fn definition(&self, token: Token<'_>, id: &str) -> Result<String, Status> {
        let r = self
            .unary(
                token,
                SILA_SERVICE,
                "GetFeatureDefinition",
                vec![("FeatureIdentifier".into(), Value::String(id.into()))],
            )
            .await?;
        match field(&r, "FeatureDefinition") {
            Value::String(s) => Ok(s),
            other => panic!("{other:?}"),
        }
    }

    fn method(&self, service: &str, method: &str) -> ppu_schema::prost_reflect::MethodDescriptor {
        let s = self
            .pool
            .get_service_by_name(service.trim_start_matches('/'))
            .unwrap_or_else(|| panic!("no service {service}"));
        s.methods()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("no method {method}"))
    }

    async fn unary(
        &self,
        token: Token<'_>,
        service: &str,
        method: &str,
        params: Vec<(String, Value)>,
    ) -> Result<DynamicMessage, Status> {
        let m = self.method(service, method);
        let input = value::to_message(&m.input(), &params).expect("parameters fit");
        self.unary_message(token, service, method, input).await
    }

    async fn unary_message(
        &self,
        token: Token<'_>,
        service: &str,
        method: &str,
        input: DynamicMessage,
    ) -> Result<DynamicMessage, Status> {
        let m = self.method(service, method);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("ready");
        grpc.unary(
            request(input, token),
            format!("{service}/{method}").parse().expect("path"),
            DynCodec(m.output()),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    async fn stream(
        &self,
        token: Token<'_>,
        service: &str,
        method: &str,
        input: DynamicMessage,
    ) -> Result<tonic::Streaming<DynamicMessage>, Status> {
        let m = self.method(service, method);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("ready");
        grpc.server_streaming(
            request(input, token),
            format!("{service}/{method}").parse().expect("path"),
            DynCodec(m.output()),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    fn execution_uuid(&self, uuid: &str) -> DynamicMessage {
        let desc = self
            .pool
            .get_message_by_name("sila2.org.silastandard.CommandExecutionUUID")
            .expect("framework type");
        let mut m = DynamicMessage::new(desc);
        m.set_field_by_name(
            "value",
            ppu_schema::prost_reflect::Value::String(uuid.into()),
        );
        m
    }
}

/// Bytes both ways, for the hand-made bootstrap call.
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

fn request<T>(msg: T, token: Token<'_>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    match token {
        Token::None => {}
        Token::Bearer(t) => {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("ascii"),
            );
        }
        Token::Metadata(t) => {
            let text = ppu_sila::framework::String { value: t.into() };
            let mut bytes = Vec::new();
            prost::encoding::message::encode(1, &text, &mut bytes);
            r.metadata_mut().insert_bin(
                ACCESS_TOKEN_HEADER,
                tonic::metadata::MetadataValue::from_bytes(&bytes),
            );
        }
    }
    r
}

/// The element `name` of a message, as a SiLA value.
fn field(msg: &DynamicMessage, name: &str) -> Value {
    value::from_message(msg)
        .expect("a SiLA message")
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no element {name} in {msg:?}"))
}

fn sila_error(s: &Status) -> SilaError {
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    SilaError::from_details(s.message().as_bytes()).expect("a SiLA error")
}

/// FurnaceProgram's parameters: ramp to `target` at 10 °C/min, hold `hold_s`.
fn program(target: f64, hold_s: f64) -> Vec<(String, Value)> {
    let segment = |ramp: Vec<Value>, hold: Vec<Value>| {
        Value::Structure(vec![
            ("Ramp".into(), Value::List(ramp)),
            ("Hold".into(), Value::List(hold)),
            ("Step".into(), Value::List(Vec::new())),
        ])
    };
    vec![
        ("Device".into(), Value::String(String::new())),
        (
            "Segments".into(),
            Value::List(vec![
                segment(
                    vec![Value::Structure(vec![
                        ("TemperatureC".into(), Value::Real(target)),
                        ("RateCPerMin".into(), Value::Real(10.0)),
                    ])],
                    Vec::new(),
                ),
                segment(
                    Vec::new(),
                    vec![Value::Structure(vec![(
                        "DurationS".into(),
                        Value::Real(hold_s),
                    )])],
                ),
            ]),
        ),
    ]
}

/// The command execution UUID of a CommandConfirmation.
fn confirmation_uuid(c: &DynamicMessage) -> String {
    let m = c
        .get_field_by_name("commandExecutionUUID")
        .and_then(|v| v.as_message().cloned())
        .expect("commandExecutionUUID");
    m.get_field_by_name("value")
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("uuid")
}

/// The UUID's experiment id (the same 128 bits as a ULID).
fn experiment_of(uuid: &str) -> String {
    let n = u128::from_str_radix(&uuid.replace('-', ""), 16).expect("hex");
    ulid::Ulid(n).to_string()
}

/// Reads ExecutionInfo until it has finished; the statuses seen.
async fn follow_info(client: &Client, token: Token<'_>, uuid: &str) -> Vec<(i32, f64)> {
    let mut s = client
        .stream(
            token,
            FURNACE,
            "FurnaceProgram_Info",
            client.execution_uuid(uuid),
        )
        .await
        .expect("Info stream");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let info = match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(info))) => info,
            other => panic!("Info ended before the command finished: {other:?} after {seen:?}"),
        };
        let status = info
            .get_field_by_name("commandStatus")
            .and_then(|v| v.as_enum_number())
            .unwrap_or(0);
        let progress = info
            .get_field_by_name("progressInfo")
            .and_then(|v| v.as_message().cloned())
            .and_then(|m| m.get_field_by_name("value").and_then(|v| v.as_f64()))
            .unwrap_or(-1.0);
        seen.push((status, progress));
        // finishedSuccessfully = 2, finishedWithError = 3
        if status >= 2 {
            return seen;
        }
    }
}

#[tokio::test]
async fn features_are_listed_defined_and_the_identity_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), Security::default())
        .await
        .expect("daemon starts");
    let client = Client::connect(lab.sila(), Token::None).await;
    let ids: Vec<String> = client
        .features
        .iter()
        .map(Feature::fully_qualified_identifier)
        .collect();
    for want in [
        "org.silastandard/core/SiLAService/v1",
        "org.silastandard/core/AuthorizationService/v1",
        "ppu/devices/Furnace/v1",
        "ppu/queue/ExperimentQueue/v1",
    ] {
        assert!(ids.iter().any(|i| i == want), "{want} missing from {ids:?}");
    }
    let furnace = client
        .features
        .iter()
        .find(|f| f.identifier == "Furnace")
        .expect("furnace feature");
    let program = furnace.command("FurnaceProgram").expect("FurnaceProgram");
    assert!(program.observable);
    assert_eq!(program.parameters[0].identifier, "Device");
    let e = client
        .definition(Token::None, "ppu/devices/Nothing/v1")
        .await
        .expect_err("unknown feature");
    assert!(
        matches!(sila_error(&e), SilaError::DefinedExecution { identifier, .. }
            if identifier == "org.silastandard/core/SiLAService/v1/DefinedExecutionError/UnimplementedFeature"),
        "{e:?}"
    );
    let get = |name: &'static str| {
        let client = &client;
        async move {
            let r = client
                .unary(
                    Token::None,
                    SILA_SERVICE,
                    &format!("Get_{name}"),
                    Vec::new(),
                )
                .await
                .expect("property");
            match field(&r, name) {
                Value::String(s) => s,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(get("ServerType").await, "PhysicsProcessingUnit");
    let uuid = get("ServerUUID").await;
    assert_eq!(uuid.len(), 36);
    assert_eq!(get("ServerName").await, "ppud");
    client
        .unary(
            Token::None,
            SILA_SERVICE,
            "SetServerName",
            vec![("ServerName".into(), Value::String("furnace bench".into()))],
        )
        .await
        .expect("SetServerName");
    let too_long = client
        .unary(
            Token::None,
            SILA_SERVICE,
            "SetServerName",
            vec![("ServerName".into(), Value::String("x".repeat(256)))],
        )
        .await
        .expect_err("256 characters");
    assert!(
        matches!(sila_error(&too_long), SilaError::Validation { parameter, .. }
        if parameter == "org.silastandard/core/SiLAService/v1/Command/SetServerName/Parameter/ServerName")
    );

    // A restart on the same store keeps the UUID and the name a client set.
    let Lab { daemon, devlab } = lab;
    tokio::time::timeout(DEADLINE, daemon.shutdown())
        .await
        .expect("shutdown");
    let daemon = Lab::daemon(&devlab, dir.path(), Security::default())
        .await
        .expect("restart");
    let lab = Lab { daemon, devlab };
    let client = Client::connect(lab.sila(), Token::None).await;
    let r = client
        .unary(Token::None, SILA_SERVICE, "Get_ServerUUID", Vec::new())
        .await
        .expect("uuid");
    assert_eq!(field(&r, "ServerUUID"), Value::String(uuid));
    let r = client
        .unary(Token::None, SILA_SERVICE, "Get_ServerName", Vec::new())
        .await
        .expect("name");
    assert_eq!(
        field(&r, "ServerName"),
        Value::String("furnace bench".into())
    );
    lab.stop().await;
}

#[tokio::test]
async fn a_furnace_program_runs_as_an_observable_command_and_a_refusal_names_its_parameter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), Security::default())
        .await
        .expect("daemon starts");
    let client = Client::connect(lab.sila(), Token::None).await;

    // Beyond the furnace's declared limit: refused before anything is stored.
    let refused = client
        .unary(
            Token::None,
            FURNACE,
            "FurnaceProgram",
            program(5000.0, 60.0),
        )
        .await
        .expect_err("beyond max_temperature_c");
    match sila_error(&refused) {
        SilaError::Validation { parameter, message } => {
            assert_eq!(
                parameter,
                "ppu/devices/Furnace/v1/Command/FurnaceProgram/Parameter/Segments"
            );
            assert!(
                message.contains("segments[0].ramp.temperature_c"),
                "{message}"
            );
            assert!(message.contains("5000"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let confirmation = client
        .unary(
            Token::None,
            FURNACE,
            "FurnaceProgram",
            program(200.0, 600.0),
        )
        .await
        .expect("accepted");
    let uuid = confirmation_uuid(&confirmation);
    let experiment_id = experiment_of(&uuid);

    // Not finished yet (the program takes minutes of physical time): the framework says so.
    let early = client
        .unary_message(
            Token::None,
            FURNACE,
            "FurnaceProgram_Result",
            client.execution_uuid(&uuid),
        )
        .await;
    if let Err(e) = &early {
        assert!(
            matches!(
                sila_error(e),
                SilaError::Framework {
                    kind: FrameworkErrorKind::CommandExecutionNotFinished,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    let seen = follow_info(&client, Token::None, &uuid).await;
    assert_eq!(seen.last().map(|s| s.0), Some(2), "{seen:?}");
    assert!(
        seen.iter()
            .any(|(status, p)| *status == 1 && *p > 0.0 && *p < 1.0),
        "progress while running: {seen:?}"
    );
    let result = client
        .unary_message(
            Token::None,
            FURNACE,
            "FurnaceProgram_Result",
            client.execution_uuid(&uuid),
        )
        .await
        .expect("result");
    assert_eq!(
        field(&result, "ExperimentId"),
        Value::String(experiment_id.clone())
    );
    match field(&result, "Trace") {
        Value::List(samples) => assert!(!samples.is_empty(), "a sampled trace"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(field(&result, "MaxOvershootC"), Value::Real(_)));

    // An unknown execution is the framework's error.
    let unknown = client
        .unary_message(
            Token::None,
            FURNACE,
            "FurnaceProgram_Result",
            client.execution_uuid("00000000-0000-4000-8000-000000000000"),
        )
        .await
        .expect_err("unknown");
    assert!(matches!(
        sila_error(&unknown),
        SilaError::Framework {
            kind: FrameworkErrorKind::InvalidCommandExecutionUuid,
            ..
        }
    ));

    // The same experiment, over ppu.v1.
    let e = ExperimentServiceClient::new(lab.v1())
        .get_experiment(pb::GetExperimentRequest {
            id: experiment_id.clone(),
        })
        .await
        .expect("visible over ppu.v1")
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Succeeded as i32);
    assert_eq!(e.results.len(), 1);
    lab.stop().await;
}

#[tokio::test]
async fn tokens_and_roles_are_ppu_v1s_and_a_command_is_audited_with_its_principal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), secured())
        .await
        .expect("daemon starts");
    let channel = lab.sila();

    // A standard client reads SiLAService without metadata (the standard forbids it there),
    // so the server's identity and feature definitions need no token; an unknown one is
    // still refused.
    let client = Client::connect(channel, Token::None).await;
    let e = client
        .unary(
            Token::Metadata("ppu_unknown"),
            SILA_SERVICE,
            "Get_ServerName",
            Vec::new(),
        )
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // No token: anything beyond discovery is refused before any handler.
    let e = client
        .unary(Token::None, FURNACE, "FurnaceProgram", program(200.0, 60.0))
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let pv = client.method(FURNACE, "Subscribe_PvC").input();
    let e = client
        .stream(
            Token::None,
            FURNACE,
            "Subscribe_PvC",
            DynamicMessage::new(pv.clone()),
        )
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .unary(
            Token::None,
            SILA_SERVICE,
            "SetServerName",
            vec![("ServerName".into(), Value::String("mine".into()))],
        )
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A viewer reads a device property (AccessToken metadata) but cannot start a command.
    let mut readings = client
        .stream(
            Token::Metadata(VIEWER),
            FURNACE,
            "Subscribe_PvC",
            DynamicMessage::new(pv),
        )
        .await
        .expect("a viewer subscribes");
    // The first value is sent at once (empty until the furnace has been read), then on change.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let value = tokio::time::timeout_at(deadline, readings.message())
            .await
            .expect("a reading within the deadline")
            .expect("stream")
            .expect("a value");
        match field(&value, "PvC") {
            Value::List(devices) if devices.is_empty() => continue,
            Value::List(devices) => {
                assert_eq!(devices.len(), 1, "{devices:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(readings);
    let e = client
        .unary(
            Token::Metadata(VIEWER),
            FURNACE,
            "FurnaceProgram",
            program(200.0, 60.0),
        )
        .await
        .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = client
        .unary(
            Token::Bearer(VIEWER),
            SILA_SERVICE,
            "SetServerName",
            vec![("ServerName".into(), Value::String("mine".into()))],
        )
        .await
        .expect_err("viewer renames");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A planner starts one, with the AccessToken metadata; follows it with a bearer token.
    let confirmation = client
        .unary(
            Token::Metadata(PLANNER),
            FURNACE,
            "FurnaceProgram",
            program(150.0, 60.0),
        )
        .await
        .expect("planner submits");
    let uuid = confirmation_uuid(&confirmation);
    let experiment_id = experiment_of(&uuid);
    client
        .unary(
            Token::Bearer(PLANNER),
            FURNACE,
            "FurnaceProgram",
            program(5000.0, 60.0),
        )
        .await
        .expect_err("beyond the limit");
    let seen = follow_info(&client, Token::Bearer(PLANNER), &uuid).await;
    assert_eq!(seen.last().map(|s| s.0), Some(2), "{seen:?}");
    // As a standard client does, the result is fetched without metadata: the token went with
    // the command, the execution UUID names the rest.
    let result = client
        .unary_message(
            Token::None,
            FURNACE,
            "FurnaceProgram_Result",
            client.execution_uuid(&uuid),
        )
        .await
        .expect("result without metadata");
    assert_eq!(
        field(&result, "ExperimentId"),
        Value::String(experiment_id.clone())
    );

    // Over ppu.v1: the batch names the planner; the log holds the audit record of the call,
    // filed on the experiment, and the refused viewer's attempt.
    let v1 = lab.v1();
    let bearer = |t: &str| {
        let mut r = tonic::Request::new(pb::GetExperimentRequest {
            id: experiment_id.clone(),
        });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
        r
    };
    let e = ExperimentServiceClient::new(v1.clone())
        .get_experiment(bearer(VIEWER))
        .await
        .expect("experiment")
        .into_inner();
    let mut r = tonic::Request::new(pb::GetBatchRequest {
        id: e.batch_id.clone(),
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER}").parse().expect("ascii"),
    );
    let batch = ExperimentServiceClient::new(v1.clone())
        .get_batch(r)
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.submitted_by, "gp-planner");

    let mut r = tonic::Request::new(pb::StreamEventsRequest::default());
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER}").parse().expect("ascii"),
    );
    let mut events = EventServiceClient::new(v1)
        .stream_events(r)
        .await
        .expect("events")
        .into_inner();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (mut granted, mut denied, mut invalid) = (false, false, false);
    while !(granted && denied && invalid) {
        let ev = match tokio::time::timeout_at(deadline, events.message()).await {
            Ok(Ok(Some(ev))) => ev,
            other => panic!("audit records missing: {other:?}"),
        };
        if let Some(pb::event::Kind::Audit(a)) = &ev.kind
            && a.method == format!("{FURNACE}/FurnaceProgram")
        {
            if a.principal == "gp-planner" && a.code == "ABORTED" {
                // The SiLA error, readable in the record.
                assert!(a.message.starts_with("validation error for "), "{a:?}");
                assert!(a.message.contains("temperature_c"), "{a:?}");
                invalid = true;
            } else if a.principal == "gp-planner" {
                assert_eq!(a.code, "OK");
                assert_eq!(a.target, experiment_id);
                assert_eq!(ev.experiment_id, experiment_id);
                granted = true;
            } else if a.principal == "dash" {
                assert_eq!(a.code, "PERMISSION_DENIED");
                denied = true;
            }
        }
    }
    lab.stop().await;
}

#[tokio::test]
async fn sila_is_served_with_the_daemons_tls_and_plain_text_fails() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sila test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let security = Security {
        tls: Some(ppu_daemon::app::TlsPem {
            cert: server.pem().into_bytes(),
            key: server_key.serialize_pem().into_bytes(),
            client_ca: None,
        }),
        ..secured()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), security)
        .await
        .expect("daemon starts");
    let addr = lab.daemon.sila_addr().expect("SiLA is served");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("TLS handshake");
    let client = Client::connect(channel, Token::Bearer(VIEWER)).await;
    assert!(
        client
            .features
            .iter()
            .any(|f| f.fully_qualified_identifier() == "ppu/devices/Furnace/v1")
    );
    // The same endpoint in plain text does not answer.
    let plain = Client {
        channel: lab.sila(),
        pool: client.pool.clone(),
        features: Vec::new(),
    };
    plain
        .unary(
            Token::Bearer(VIEWER),
            SILA_SERVICE,
            "Get_ServerName",
            Vec::new(),
        )
        .await
        .expect_err("plain text to a TLS endpoint");
    lab.stop().await;
}

#[tokio::test]
async fn the_server_is_discoverable_over_mdns_by_its_uuid() {
    use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
    let dir = tempfile::tempdir().expect("tempdir");
    let devlab = DevLab::start(Clock::new(2000.0), 1)
        .await
        .expect("simulated furnace");
    let security = Security {
        sila: Some(SilaSettings {
            mdns: true,
            server_name: "bench ppud".into(),
            ..SilaSettings::at("127.0.0.1:0".parse().expect("addr"))
        }),
        ..Security::default()
    };
    let daemon = devlab
        .start_secured_daemon(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path(),
            PollSettings {
                poll_interval: Duration::from_millis(100),
                reading_log_interval: Duration::from_secs(1),
            },
            &Policies::default(),
            security,
        )
        .await
        .expect("daemon starts");
    let lab = Lab { daemon, devlab };
    let port = lab.daemon.sila_addr().expect("served").port();
    let client = Client::connect(lab.sila(), Token::None).await;
    let uuid = match field(
        &client
            .unary(Token::None, SILA_SERVICE, "Get_ServerUUID", Vec::new())
            .await
            .expect("uuid"),
        "ServerUUID",
    ) {
        Value::String(s) => s,
        other => panic!("{other:?}"),
    };
    let found = tokio::task::spawn_blocking(move || {
        let browser = ServiceDaemon::new().expect("mDNS");
        browser.disable_interface(IfKind::All).expect("interfaces");
        browser
            .enable_interface(IfKind::LoopbackV4)
            .expect("loopback");
        let events = browser.browse("_sila._tcp.local.").expect("browse");
        let deadline = std::time::Instant::now() + DEADLINE;
        let found = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match events.recv_timeout(left) {
                Ok(ServiceEvent::ServiceResolved(info))
                    if info.get_fullname().starts_with(&uuid) =>
                {
                    break Some((
                        info.get_port(),
                        info.get_property_val_str("server_name").map(str::to_owned),
                    ));
                }
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let _ = browser.shutdown();
        found
    })
    .await
    .expect("browser");
    assert_eq!(found, Some((port, Some("bench ppud".to_owned()))));
    lab.stop().await;
}

const QUEUE: &str = "/sila2.ppu.queue.experimentqueue.v1.ExperimentQueue";

#[tokio::test]
async fn the_experiment_queue_submits_reads_follows_and_its_executions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), Security::default())
        .await
        .expect("daemon starts");
    let client = Client::connect(lab.sila(), Token::None).await;
    let text = |r: &DynamicMessage, name: &str| match field(r, name) {
        Value::String(s) => s,
        other => panic!("{other:?}"),
    };

    // QueueLength answers at once.
    let input = client.method(QUEUE, "Subscribe_QueueLength").input();
    let mut length = client
        .stream(
            Token::None,
            QUEUE,
            "Subscribe_QueueLength",
            DynamicMessage::new(input),
        )
        .await
        .expect("QueueLength");
    let first = tokio::time::timeout(DEADLINE, length.message())
        .await
        .expect("within the deadline")
        .expect("stream")
        .expect("a value");
    assert_eq!(field(&first, "QueueLength"), Value::Integer(0));
    drop(length);

    // ppu.v1's ExperimentSpec in protobuf JSON, typed furnace alias and all.
    let spec = r#"{"name": "sila queue", "steps": [{"furnace": {"segments": [
        {"ramp": {"temperatureC": 150, "rateCPerMin": 10}}, {"hold": {"durationS": 60}}]}}]}"#;
    let r = client
        .unary(
            Token::None,
            QUEUE,
            "SubmitExperiment",
            vec![("Experiment".into(), Value::String(spec.into()))],
        )
        .await
        .expect("submitted");
    let id = text(&r, "ExperimentId");
    let got = client
        .unary(
            Token::None,
            QUEUE,
            "GetExperiment",
            vec![("ExperimentId".into(), Value::String(id.clone()))],
        )
        .await
        .expect("read");
    assert_eq!(field(&got, "StepCount"), Value::Integer(1));
    assert!(
        ["QUEUED", "RUNNING", "SUCCEEDED"].contains(&text(&got, "State").as_str()),
        "{got:?}"
    );

    let confirmation = client
        .unary(
            Token::None,
            QUEUE,
            "FollowExperiment",
            vec![("ExperimentId".into(), Value::String(id.clone()))],
        )
        .await
        .expect("follow");
    let uuid = confirmation_uuid(&confirmation);
    assert_eq!(experiment_of(&uuid), id);
    let mut info = client
        .stream(
            Token::None,
            QUEUE,
            "FollowExperiment_Info",
            client.execution_uuid(&uuid),
        )
        .await
        .expect("Info");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let i = match tokio::time::timeout_at(deadline, info.message()).await {
            Ok(Ok(Some(i))) => i,
            other => panic!("Info ended early: {other:?}"),
        };
        if i.get_field_by_name("commandStatus")
            .and_then(|v| v.as_enum_number())
            == Some(2)
        {
            break;
        }
    }

    // Refusals: bad JSON names the parameter; an unknown id is the defined error.
    let bad = client
        .unary(
            Token::None,
            QUEUE,
            "SubmitExperiment",
            vec![("Experiment".into(), Value::String("{\"steps\": 3}".into()))],
        )
        .await
        .expect_err("not a spec");
    assert!(
        matches!(sila_error(&bad), SilaError::Validation { parameter, .. }
        if parameter == "ppu/queue/ExperimentQueue/v1/Command/SubmitExperiment/Parameter/Experiment")
    );
    let unknown = client
        .unary(
            Token::None,
            QUEUE,
            "GetExperiment",
            vec![("ExperimentId".into(), Value::String("nope".into()))],
        )
        .await
        .expect_err("unknown");
    assert!(
        matches!(sila_error(&unknown), SilaError::DefinedExecution { identifier, .. }
        if identifier == "ppu/queue/ExperimentQueue/v1/DefinedExecutionError/UnknownExperiment")
    );

    // The execution UUID is the experiment's id: after a restart it still names it.
    let Lab { daemon, devlab } = lab;
    tokio::time::timeout(DEADLINE, daemon.shutdown())
        .await
        .expect("shutdown");
    let daemon = Lab::daemon(&devlab, dir.path(), Security::default())
        .await
        .expect("restart");
    let lab = Lab { daemon, devlab };
    let client = Client::connect(lab.sila(), Token::None).await;
    let result = client
        .unary_message(
            Token::None,
            QUEUE,
            "FollowExperiment_Result",
            client.execution_uuid(&uuid),
        )
        .await
        .expect("result after a restart");
    assert_eq!(text(&result, "State"), "SUCCEEDED");
    assert_eq!(text(&result, "Error"), "");
    lab.stop().await;
}

#[tokio::test]
async fn an_unobservable_command_answers_when_its_experiment_has_finished() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut devlab = DevLab::start(Clock::new(2000.0), 0).await.expect("lab");
    devlab
        .add_dispensing_station()
        .await
        .expect("simulated pumps and balance");
    let daemon = Lab::daemon(&devlab, dir.path(), Security::default())
        .await
        .expect("daemon starts");
    let lab = Lab { daemon, devlab };
    let client = Client::connect(lab.sila(), Token::None).await;
    let balance = client
        .features
        .iter()
        .find(|f| f.identifier == "Balance")
        .expect("balance feature");
    assert!(!balance.command("Weigh").expect("Weigh").observable);
    let r = client
        .unary(
            Token::None,
            "/sila2.ppu.devices.balance.v1.Balance",
            "Weigh",
            vec![
                ("Device".into(), Value::String(String::new())),
                ("StabilityTimeoutS".into(), Value::Real(0.0)),
            ],
        )
        .await
        .expect("weighed");
    let Value::String(id) = field(&r, "ExperimentId") else {
        panic!("ExperimentId")
    };
    assert!(matches!(field(&r, "MassG"), Value::Real(m) if m > 0.0));
    // The call returned once the experiment had finished.
    let e = ExperimentServiceClient::new(lab.v1())
        .get_experiment(pb::GetExperimentRequest { id })
        .await
        .expect("experiment")
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Succeeded as i32);
    lab.stop().await;
}
