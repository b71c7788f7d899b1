//! ppud end to end: the generated tonic client against the daemon and the simulated lab.

use ppu_proto::v1 as pb;
use ppu_tests::*;
use tonic::Code;

fn program_a() -> Vec<pb::furnace_segment::Kind> {
    vec![ramp(300.0, 10.0), hold(1800.0), step_to(150.0)]
}

fn program_b() -> Vec<pb::furnace_segment::Kind> {
    vec![ramp(450.0, 15.0), hold(600.0)]
}

fn program_c() -> Vec<pb::furnace_segment::Kind> {
    vec![step_to(200.0), hold(900.0), ramp(250.0, 5.0)]
}

/// Tolerance, °C, within which the trace must come to every programmed target.
const TRACE_TOLERANCE_C: f64 = 3.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_furnace_experiments_succeed_with_a_gapless_event_log() {
    let lab = Lab::start(1).await;
    let mut exps = lab.experiments().await;
    let specs = vec![
        furnace_experiment("a", program_a()),
        furnace_experiment("b", program_b()),
        furnace_experiment("c", program_c()),
    ];
    let resp = exps
        .submit_batch(batch("three", specs.clone()))
        .await
        .unwrap()
        .into_inner();
    let ids = resp.batch.unwrap().experiment_ids;
    assert_eq!(ids.len(), 3);

    let mut stream = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    read_until(&mut stream, &mut events, |ev| {
        ids.iter().all(|id| finished(ev).contains(id))
    })
    .await;

    for w in events.windows(2) {
        assert_eq!(
            w[1].sequence,
            w[0].sequence + 1,
            "gap or disorder between {} and {}",
            w[0].sequence,
            w[1].sequence
        );
    }
    assert_eq!(events[0].sequence, 1);

    for (id, spec) in ids.iter().zip(&specs) {
        let e = exps
            .get_experiment(pb::GetExperimentRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            e.state,
            pb::ExperimentState::Succeeded as i32,
            "{}: {}",
            e.id,
            e.message
        );
        let Some(pb::step_result::Result::Furnace(f)) = e.results[0].result.clone() else {
            panic!("no furnace result for {id}");
        };
        assert!(
            f.trace.len() > 10,
            "trace has only {} samples",
            f.trace.len()
        );
        let Some(pb::step::Kind::Furnace(program)) = &spec.steps[0].kind else {
            unreachable!()
        };
        for (k, seg) in program.segments.iter().enumerate() {
            let target = match &seg.kind {
                Some(pb::furnace_segment::Kind::Ramp(r)) => r.temperature_c,
                Some(pb::furnace_segment::Kind::Step(s)) => s.temperature_c,
                _ => continue,
            };
            let reached = f.targets.iter().find(|t| t.segment_index == k as u32);
            let reached =
                reached.unwrap_or_else(|| panic!("{id}: segment {k} target {target} not reported"));
            assert_eq!(reached.temperature_c, target);
            let closest = f
                .trace
                .iter()
                .map(|s| (s.pv_c - target).abs())
                .fold(f64::INFINITY, f64::min);
            assert!(
                closest <= TRACE_TOLERANCE_C,
                "{id}: trace never within {TRACE_TOLERANCE_C} °C of {target} (closest {closest})"
            );
        }
    }
    // The furnace was left safe: setpoint at the safe value.
    let snap = lab.devlab.furnaces[0].sim.snapshot();
    assert!(
        (snap.target_sp_c - 25.0).abs() < 0.01,
        "furnace left at setpoint {}",
        snap.target_sp_c
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_event_stream_resumes_with_no_gap_and_no_duplicate() {
    let lab = Lab::start(1).await;
    let mut exps = lab.experiments().await;
    let ids = exps
        .submit_batch(batch(
            "resume",
            vec![
                furnace_experiment("r1", program_b()),
                furnace_experiment("r2", program_c()),
            ],
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;

    let mut first = Vec::new();
    {
        let mut s = lab
            .events()
            .await
            .stream_events(pb::StreamEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        read_until(&mut s, &mut first, |ev| ev.len() >= 7).await;
    } // dropped mid-stream
    let last = first.last().unwrap().sequence;
    let mut second = Vec::new();
    let mut s = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest {
            from_sequence: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    read_until(&mut s, &mut second, |ev| {
        ids.iter().all(|id| finished(ev).contains(id))
    })
    .await;

    let union: Vec<u64> = first.iter().chain(&second).map(|e| e.sequence).collect();
    let expected: Vec<u64> = (1..=*union.last().unwrap()).collect();
    assert_eq!(
        union, expected,
        "union of both streams must be every sequence exactly once"
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmission_is_idempotent_and_a_reused_key_with_new_content_is_refused() {
    let lab = Lab::start(1).await;
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    let mut exps = lab.experiments().await;
    let req = batch(
        "idem-1",
        vec![
            furnace_experiment("i1", program_a()),
            furnace_experiment("i2", program_b()),
        ],
    );
    let first = exps.submit_batch(req.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let again = exps.submit_batch(req.clone()).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.batch, first.batch, "same batch and experiment ids");

    let batch_id = first.batch.as_ref().unwrap().id.clone();
    let mut s = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest {
            batch_id: batch_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    read_until(&mut s, &mut events, |ev| ev.len() >= 2).await;
    // A marker event after the resubmission bounds the log: nothing of the batch in between.
    lab.queue()
        .await
        .resume_queue(pb::ResumeQueueRequest::default())
        .await
        .unwrap();
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest {
            reason: "marker".into(),
        })
        .await
        .unwrap();
    let mut all = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut log = Vec::new();
    read_until(&mut all, &mut log, |ev| {
        ev.iter().any(|e| matches!(&e.kind, Some(pb::event::Kind::QueueStateChanged(q)) if q.reason == "marker"))
    })
    .await;
    let queued_events = log
        .iter()
        .filter(|e| e.batch_id == batch_id && matches!(&e.kind, Some(pb::event::Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Queued as i32))
        .count();
    assert_eq!(queued_events, 2, "the resubmission must not enqueue again");
    let listed = exps
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.experiments.len(), 2);

    let mut changed = req;
    changed.experiments[0].name = "different".into();
    let err = exps.submit_batch(changed).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("idem-1"), "{}", err.message());
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_refused_with_the_field_path_and_store_nothing() {
    let lab = Lab::start(1).await;
    let mut exps = lab.experiments().await;
    let pinned = |device: &str| {
        let mut e = furnace_experiment("p", vec![ramp(100.0, 5.0)]);
        e.steps[0].device_id = device.into();
        e
    };
    let cases: Vec<(&str, pb::SubmitBatchRequest, Code, &str)> = vec![
        (
            "above max temperature",
            batch(
                "bad-1",
                vec![
                    furnace_experiment("ok", program_a()),
                    furnace_experiment("hot", vec![ramp(1500.0, 5.0)]),
                ],
            ),
            Code::InvalidArgument,
            "experiments[1].steps[0].furnace.segments[0].ramp.temperature_c",
        ),
        (
            "NaN",
            batch(
                "bad-2",
                vec![furnace_experiment(
                    "nan",
                    vec![ramp(200.0, 5.0), hold(f64::NAN)],
                )],
            ),
            Code::InvalidArgument,
            "experiments[0].steps[0].furnace.segments[1].hold.duration_s",
        ),
        (
            "unknown pinned device",
            batch("bad-3", vec![pinned("furnace-9")]),
            Code::InvalidArgument,
            "experiments[0].steps[0].device_id",
        ),
        (
            "empty batch",
            batch("bad-4", vec![]),
            Code::InvalidArgument,
            "experiments",
        ),
        (
            "ramp too fast",
            batch(
                "bad-5",
                vec![furnace_experiment("fast", vec![ramp(200.0, 90.0)])],
            ),
            Code::InvalidArgument,
            "experiments[0].steps[0].furnace.segments[0].ramp.rate_c_per_min",
        ),
        (
            "negative hold",
            batch("bad-6", vec![furnace_experiment("neg", vec![hold(-1.0)])]),
            Code::InvalidArgument,
            "experiments[0].steps[0].furnace.segments[0].hold.duration_s",
        ),
        (
            "no steps",
            batch(
                "bad-7",
                vec![pb::ExperimentSpec {
                    name: "empty".into(),
                    ..Default::default()
                }],
            ),
            Code::InvalidArgument,
            "experiments[0].steps",
        ),
        (
            "no dispensers yet",
            batch(
                "bad-8",
                vec![pb::ExperimentSpec {
                    steps: vec![pb::Step {
                        device_id: String::new(),
                        kind: Some(pb::step::Kind::Dispense(pb::Dispense {
                            reagent: "A".into(),
                            volume_ml: 1.0,
                            rate_ml_per_min: 1.0,
                        })),
                    }],
                    ..Default::default()
                }],
            ),
            Code::FailedPrecondition,
            "no device with capability dispense",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = exps.submit_batch(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            err.message()
        );
        let listed = exps
            .list_experiments(pb::ListExperimentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed.experiments.is_empty(),
            "{what}: something was stored"
        );
    }
    let hot = exps
        .submit_batch(batch(
            "bad-9",
            vec![furnace_experiment("hot", vec![ramp(1500.0, 5.0)])],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        hot.metadata()
            .get("ppu-field-path")
            .and_then(|v| v.to_str().ok()),
        Some("experiments[0].steps[0].furnace.segments[0].ramp.temperature_c")
    );
    assert!(
        hot.message().contains("1100"),
        "names the limit: {}",
        hot.message()
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_program_leaves_the_furnace_safe() {
    let lab = Lab::start(1).await;
    let mut exps = lab.experiments().await;
    let ids = exps
        .submit_batch(batch(
            "cancel",
            vec![
                furnace_experiment("long", vec![ramp(400.0, 10.0), hold(36000.0)]),
                furnace_experiment("next", program_b()),
            ],
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;
    // Cancel the queued one first: it never runs.
    let c = exps
        .cancel_experiment(pb::CancelExperimentRequest {
            id: ids[1].clone(),
            reason: "not needed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state, pb::ExperimentState::Cancelled as i32);

    let mut s = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest {
            experiment_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| ev.iter().any(|e| matches!(&e.kind, Some(pb::event::Kind::StepProgress(p)) if p.message.contains("hold")))).await;
    assert!(
        lab.devlab.furnaces[0].sim.snapshot().target_sp_c > 300.0,
        "furnace is heating"
    );
    let c = exps
        .cancel_experiment(pb::CancelExperimentRequest {
            id: ids[0].clone(),
            reason: "operator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.state,
        pb::ExperimentState::Cancelled as i32,
        "{}",
        c.message
    );
    assert_eq!(c.results[0].outcome, pb::StepOutcome::Aborted as i32);
    let snap = lab.devlab.furnaces[0].sim.snapshot();
    assert!(
        (snap.target_sp_c - 25.0).abs() < 0.01,
        "furnace left at setpoint {}",
        snap.target_sp_c
    );

    let again = exps
        .cancel_experiment(pb::CancelExperimentRequest {
            id: ids[0].clone(),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let unknown = exps
        .cancel_experiment(pb::CancelExperimentRequest {
            id: "nope".into(),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_starts_nothing_until_resumed() {
    let lab = Lab::start(1).await;
    let q = lab
        .queue()
        .await
        .pause_queue(pb::PauseQueueRequest {
            reason: "bench work".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.state, pb::QueueState::Paused as i32);
    let mut exps = lab.experiments().await;
    let ids = exps
        .submit_batch(batch("paused", vec![furnace_experiment("p", program_b())]))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;
    let q = lab
        .queue()
        .await
        .get_queue(pb::GetQueueRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.queued_ids, ids);
    assert!(q.running_ids.is_empty());

    let mut s = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest {
            experiment_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    lab.queue()
        .await
        .resume_queue(pb::ResumeQueueRequest {})
        .await
        .unwrap();
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    // Nothing ran before the resume: the only RUNNING transition follows it in the log.
    let e = exps
        .get_experiment(pb::GetExperimentRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Succeeded as i32);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_state_batch_and_label_and_pages() {
    let lab = Lab::start(1).await;
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    let mut exps = lab.experiments().await;
    let mut specs: Vec<pb::ExperimentSpec> = (0..5)
        .map(|i| furnace_experiment(&format!("l{i}"), program_b()))
        .collect();
    specs[3].labels.insert("round".into(), "2".into());
    let b1 = exps
        .submit_batch(batch("list-1", specs))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    let b2 = exps
        .submit_batch(batch(
            "list-2",
            vec![furnace_experiment("other", program_b())],
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();

    let page = |state: i32, batch_id: &str, size: u32, token: &str| pb::ListExperimentsRequest {
        state,
        batch_id: batch_id.into(),
        page_size: size,
        page_token: token.into(),
        ..Default::default()
    };
    let p1 = exps
        .list_experiments(page(0, &b1.id, 2, ""))
        .await
        .unwrap()
        .into_inner();
    let p2 = exps
        .list_experiments(page(0, &b1.id, 2, &p1.next_page_token))
        .await
        .unwrap()
        .into_inner();
    let p3 = exps
        .list_experiments(page(0, &b1.id, 2, &p2.next_page_token))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = [p1, p2, p3.clone()]
        .iter()
        .flat_map(|p| p.experiments.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(ids, b1.experiment_ids);
    assert!(p3.next_page_token.is_empty());

    let mut labelled = pb::ListExperimentsRequest::default();
    labelled.labels.insert("round".into(), "2".into());
    let l = exps.list_experiments(labelled).await.unwrap().into_inner();
    assert_eq!(
        l.experiments
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![b1.experiment_ids[3].clone()]
    );

    exps.cancel_experiment(pb::CancelExperimentRequest {
        id: b2.experiment_ids[0].clone(),
        reason: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cancelled = exps
        .list_experiments(page(pb::ExperimentState::Cancelled as i32, "", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.experiments.len(), 1);
    let got = exps
        .get_batch(pb::GetBatchRequest { id: b2.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, b2);
    assert_eq!(
        exps.get_batch(pb::GetBatchRequest { id: "x".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_with_limits_and_live_readings() {
    let lab = Lab::start(2).await;
    let mut devs = lab.devices().await;
    let list = devs
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(
        list.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["furnace-1", "furnace-2"]
    );
    let d = &list[0];
    assert_eq!(d.family, pb::DeviceFamily::Furnace as i32);
    assert_eq!(d.driver, "eurotherm");
    assert!(
        d.transport.starts_with("modbus-tcp://127.0.0.1:"),
        "{}",
        d.transport
    );
    assert_eq!(d.capabilities, vec![pb::Capability::FurnaceProgram as i32]);
    assert_eq!(d.limits.as_ref().unwrap().max_temperature_c, Some(1100.0));

    let mut w = devs
        .watch_device(pb::WatchDeviceRequest {
            id: "furnace-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(DEADLINE, w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.device_id, "furnace-2");
    let pv = r
        .values
        .iter()
        .find(|v| v.name == "pv_c")
        .expect("pv reading");
    assert!(
        (pv.value - 25.0).abs() < 5.0,
        "idle furnace near ambient: {}",
        pv.value
    );
    let got = devs
        .get_device(pb::GetDeviceRequest {
            id: "furnace-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.connection, pb::ConnectionState::Connected as i32);
    assert!(got.latest.is_some());
    assert_eq!(
        devs.get_device(pb::GetDeviceRequest { id: "oven".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_and_reflection_lists_the_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let lab = Lab::start(1).await;
    let mut health = HealthClient::new(lab.channel().await);
    for service in ["", "ppu.v1.ExperimentService", "ppu.v1.EventService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let mut refl = ServerReflectionClient::new(lab.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures_util::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected {msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "ppu.v1.ExperimentService",
        "ppu.v1.QueueService",
        "ppu.v1.EventService",
        "ppu.v1.DeviceService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    lab.stop().await;
}
