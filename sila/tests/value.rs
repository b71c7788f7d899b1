//! Values through the descriptors (to and from dynamic messages) and the constraint checks.

use ppu_sila::descriptor;
use ppu_sila::error::SilaError;
use ppu_sila::fdl::{Basic, DataType, Feature};
use ppu_sila::value::{self, Value};
use prost::Message;
use prost_reflect::DynamicMessage;

type Values = Vec<(String, Value)>;

const EVERYTHING: &str = include_str!("data/Everything.sila.xml");

fn feature() -> Feature {
    Feature::from_xml(EVERYTHING).unwrap()
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn segment(target: f64, hold: f64) -> Value {
    Value::Structure(vec![
        ("Target".into(), Value::Real(target)),
        ("Hold".into(), Value::Real(hold)),
        (
            "Day".into(),
            Value::Date {
                year: 2026,
                month: 12,
                day: 6,
                tz_minutes: -330,
            },
        ),
        (
            "At".into(),
            Value::Time {
                hour: 20,
                minute: 5,
                second: 7,
                millisecond: 250,
                tz_minutes: 60,
            },
        ),
    ])
}

fn parameters(segments: Vec<Value>, atmosphere: &str, label: &str) -> Values {
    vec![
        ("Segments".into(), Value::List(segments)),
        ("Atmosphere".into(), s(atmosphere)),
        (
            "Options".into(),
            Value::Structure(vec![
                ("Label".into(), s(label)),
                ("Tags".into(), Value::List(vec![s("a"), s("b")])),
                (
                    "Nested".into(),
                    Value::Structure(vec![("Flag".into(), Value::Boolean(true))]),
                ),
            ]),
        ),
    ]
}

#[test]
fn parameters_round_trip_through_the_wire() {
    let f = feature();
    let pool = descriptor::pool(std::slice::from_ref(&f)).unwrap();
    let d = pool
        .get_message_by_name(&descriptor::message_name(&f, "RunProgram_Parameters"))
        .unwrap();
    let values = parameters(
        vec![segment(500.0, 30.0), segment(25.0, 5.5)],
        "Ar",
        "run_1",
    );
    let message = value::to_message(&d, &values).unwrap();
    let bytes = message.encode_to_vec();
    let decoded = DynamicMessage::decode(d, bytes.as_slice()).unwrap();
    assert_eq!(value::from_message(&decoded).unwrap(), values);
}

#[test]
fn wire_bytes_of_a_real_response() {
    // Get_StartedAt_Responses would be a Timestamp; take the DataType_Temperature message:
    // field 1 (Temperature) = Real{value = 1.5}: 0a 09 09 <1.5 as f64 LE>.
    let f = feature();
    let pool = descriptor::pool(std::slice::from_ref(&f)).unwrap();
    let d = pool
        .get_message_by_name(&descriptor::message_name(
            &f,
            "RunProgram_IntermediateResponses",
        ))
        .unwrap();
    let m = value::to_message(&d, &[("CurrentTemperature".into(), Value::Real(1.5))]).unwrap();
    let mut expected = vec![0x0a, 0x0b, 0x0a, 0x09, 0x09];
    expected.extend_from_slice(&1.5f64.to_le_bytes());
    assert_eq!(m.encode_to_vec(), expected);
}

#[test]
fn wrong_shapes_are_named() {
    let f = feature();
    let pool = descriptor::pool(std::slice::from_ref(&f)).unwrap();
    let d = pool
        .get_message_by_name(&descriptor::message_name(&f, "RunProgram_Parameters"))
        .unwrap();
    let e = value::to_message(&d, &[("Atmosphere".into(), Value::Integer(3))]).unwrap_err();
    assert_eq!(e.path, "Atmosphere");
    let e = value::to_message(&d, &[("Colour".into(), s("red"))]).unwrap_err();
    assert_eq!(e.path, "Colour");
    let bad = parameters(
        vec![Value::Structure(vec![("Target".into(), s("hot"))])],
        "Ar",
        "x",
    );
    let e = value::to_message(&d, &bad).unwrap_err();
    assert_eq!(e.path, "Segments[0].Target");
}

#[test]
fn constraints_are_checked() {
    let f = feature();
    let run = f.command("RunProgram").unwrap();
    let ok = parameters(vec![segment(500.0, 30.0)], "N2", "run-1");
    value::check_parameters(&f, run, &ok).unwrap();

    let cases: Vec<(Values, &str, &str)> = vec![
        (
            parameters(vec![], "N2", "x"),
            "Segments",
            "fewer than the minimum 1",
        ),
        (
            parameters(vec![segment(500.0, 30.0)], "He", "x"),
            "Atmosphere",
            "\"He\" is not one of N2, Ar, CO2",
        ),
        (
            parameters(vec![segment(500.0, 30.0)], "N2", "bad label"),
            "Options",
            "does not match the pattern",
        ),
        (
            parameters(vec![segment(500.0, 30.0)], "N2", ""),
            "Options",
            "below the minimum 1",
        ),
        (
            parameters(vec![segment(-300.0, 30.0)], "N2", "x"),
            "Segments",
            "Segments[0].Target: -300 is below the minimum -273.15",
        ),
        (
            parameters(vec![segment(20.0, 0.0)], "N2", "x"),
            "Segments",
            "Segments[0].Hold: 0 is not above 0",
        ),
    ];
    for (values, parameter, reason) in cases {
        let Err(SilaError::Validation {
            parameter: p,
            message,
        }) = value::check_parameters(&f, run, &values)
        else {
            panic!("{reason}: accepted");
        };
        assert_eq!(
            p,
            format!("org.example/tests/Everything/v2/Command/RunProgram/Parameter/{parameter}")
        );
        assert!(message.contains(reason), "{message} should say {reason}");
    }
    let mut missing = ok.clone();
    missing.pop();
    assert!(value::check_parameters(&f, run, &missing).is_err());
}

#[test]
fn bounds_on_integers_and_any_types() {
    let f = feature();
    let zones = &f.property("Temperatures").unwrap().data_type;
    let reading = |zone| {
        Value::List(vec![Value::Structure(vec![
            ("Zone".into(), Value::Integer(zone)),
            ("Value".into(), Value::Real(20.0)),
        ])])
    };
    value::check(&f, zones, &reading(8), "Temperatures").unwrap();
    let e = value::check(&f, zones, &reading(9), "Temperatures").unwrap_err();
    assert_eq!(e.path, "Temperatures[0].Zone");
    assert!(value::check(&f, zones, &reading(0), "T").is_err());

    let any = &f.property("Anything").unwrap().data_type;
    let real = DataType::Basic(ppu_sila::fdl::Basic::Real).to_xml();
    let ok = Value::Any {
        type_xml: real,
        payload: vec![],
    };
    value::check(&f, any, &ok, "Anything").unwrap();
    let string = DataType::Basic(ppu_sila::fdl::Basic::String).to_xml();
    let bad = Value::Any {
        type_xml: string,
        payload: vec![],
    };
    assert!(value::check(&f, any, &bad, "Anything").is_err());
}

#[test]
fn fully_qualified_identifiers_and_timestamps() {
    let fqi = Feature::from_xml(&EVERYTHING.replace(
        "<Pattern>[A-Za-z0-9_-]+</Pattern>",
        "<FullyQualifiedIdentifier>CommandParameterIdentifier</FullyQualifiedIdentifier>",
    ))
    .unwrap();
    let run = fqi.command("RunProgram").unwrap();
    let label = |l: &str| parameters(vec![segment(20.0, 1.0)], "N2", l);
    value::check_parameters(&fqi, run, &label("a/c/F/v1/Command/R/Parameter/X")).unwrap();
    assert!(value::check_parameters(&fqi, run, &label("a/c/F/v1/Command/R")).is_err());

    let bounded = Feature::from_xml(&EVERYTHING.replace(
        "<Basic>Timestamp</Basic>",
        "<Constrained><DataType><Basic>Timestamp</Basic></DataType><Constraints>\
         <MinimalInclusive>2026-01-01T00:00:00Z</MinimalInclusive></Constraints></Constrained>",
    ))
    .unwrap();
    let t = &bounded.property("StartedAt").unwrap().data_type;
    let stamp = |year, hour, tz_minutes| Value::Timestamp {
        year,
        month: 1,
        day: 1,
        hour,
        minute: 30,
        second: 0,
        millisecond: 0,
        tz_minutes,
    };
    value::check(&bounded, t, &stamp(2026, 0, 0), "StartedAt").unwrap();
    // 00:30 at +01:00 is 23:30 the day before in UTC.
    assert!(value::check(&bounded, t, &stamp(2026, 0, 60), "StartedAt").is_err());
    assert!(value::check(&bounded, t, &stamp(2025, 23, 0), "StartedAt").is_err());
}

#[test]
fn temporal_text_round_trips_and_malformed_text_is_none() {
    for (basic, text) in [
        (Basic::Date, "2026-12-06Z"),
        (Basic::Time, "13:05:00.250+01:30"),
        (Basic::Timestamp, "2026-12-06T13:05:00.000-05:00"),
    ] {
        let v = Value::parse_temporal(basic, text).expect(text);
        assert_eq!(v.temporal_text().as_deref(), Some(text));
    }
    // No zone is UTC, written back with `Z`; a fraction is read to milliseconds.
    let v = Value::parse_temporal(Basic::Time, "13:05:00.5").unwrap();
    assert_eq!(v.temporal_text().as_deref(), Some("13:05:00.500Z"));
    assert_eq!(Value::parse_temporal(Basic::Date, "2026-12"), None);
    assert_eq!(Value::parse_temporal(Basic::Time, "13:05:00+1:x0"), None);
    assert_eq!(Value::parse_temporal(Basic::Real, "2026-12-06"), None);
    assert_eq!(Value::Real(1.0).temporal_text(), None);
}
