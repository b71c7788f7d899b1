//! A made-up family (`tests/data/probe.proto`) with the field shapes the real families do not
//! use: enums, optional scalars, integer widths, bytes, an empty message, an unobservable
//! command.

mod support;

use ppu_sila::descriptor;
use ppu_sila::error::SilaError;
use ppu_sila::family::{self, FamilyFeature};
use ppu_sila::fdl::{Basic, DataType};
use ppu_sila::value::{self, Value};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value as R};

const SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe_test.bin"));

fn probe() -> (FamilyFeature, DescriptorPool, ppu_schema::Schema) {
    let schema = ppu_schema::Schema::new(&[SET]).unwrap();
    let f = FamilyFeature::generate(&schema, "lab_probe").unwrap();
    let pool = descriptor::pool(std::slice::from_ref(&f.feature)).unwrap();
    (f, pool, schema)
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn parameters(gain: Vec<Value>, repeats: i64, label: &str) -> Vec<(String, Value)> {
    [
        ("Device", s("")),
        ("Mode", s("MODE_GENTLE")),
        ("Gain", Value::List(gain)),
        ("Repeats", Value::Integer(repeats)),
        ("Offset", Value::Integer(-5_000_000_000)),
        ("Blob", Value::Binary(vec![0, 1, 2])),
        ("Verbose", Value::Boolean(true)),
        ("Nothing", s("")),
        (
            "Modes",
            Value::List(vec![s("MODE_FAST"), s("MODE_UNSPECIFIED")]),
        ),
        ("Label", s(label)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn wire(pool: &DescriptorPool, f: &FamilyFeature, values: &[(String, Value)]) -> DynamicMessage {
    let d = pool
        .get_message_by_name(&descriptor::message_name(&f.feature, "Measure_Parameters"))
        .unwrap();
    let bytes = value::to_message(&d, values).unwrap().encode_to_vec();
    DynamicMessage::decode(d, bytes.as_slice()).unwrap()
}

#[test]
fn shapes_map_to_sila_types() {
    let (f, _, _) = probe();
    assert_eq!(f.feature.identifier, "LabProbe");
    let c = f.feature.command("Measure").unwrap();
    assert!(!c.observable);
    let ty = |name: &str| {
        &c.parameters
            .iter()
            .find(|p| p.identifier == name)
            .unwrap()
            .data_type
    };
    let DataType::Constrained(mode, set) = ty("Mode") else {
        panic!("Mode is constrained")
    };
    assert_eq!(**mode, DataType::Basic(Basic::String));
    assert_eq!(set.set, ["MODE_UNSPECIFIED", "MODE_FAST", "MODE_GENTLE"]);
    let DataType::Constrained(gain, count) = ty("Gain") else {
        panic!("Gain is constrained")
    };
    assert_eq!(count.maximal_element_count, Some(1));
    assert!(matches!(&**gain, DataType::List(_)));
    let DataType::Constrained(_, repeats) = ty("Repeats") else {
        panic!()
    };
    assert_eq!(repeats.minimal_inclusive.as_deref(), Some("1"));
    assert_eq!(repeats.maximal_inclusive.as_deref(), Some("4294967295"));
    assert_eq!(*ty("Offset"), DataType::Basic(Basic::Integer));
    assert_eq!(*ty("Blob"), DataType::Basic(Basic::Binary));
    assert_eq!(*ty("Nothing"), DataType::Identifier("Nothing".into()));
    assert_eq!(f.readings.len(), 2);
}

#[test]
fn a_call_translates_every_shape() {
    let (f, pool, _) = probe();
    let call = f
        .call(
            "Measure",
            &wire(&pool, &f, &parameters(vec![Value::Real(2.5)], 3, "x")),
        )
        .unwrap();
    let m = &call.command;
    let get = |name: &str| m.get_field_by_name(name).unwrap().into_owned();
    assert_eq!(get("mode"), R::EnumNumber(2));
    assert_eq!(get("gain"), R::F64(2.5));
    assert!(m.has_field_by_name("gain"));
    assert_eq!(get("repeats"), R::U32(3));
    assert_eq!(get("offset"), R::I64(-5_000_000_000));
    assert_eq!(get("blob"), R::Bytes(vec![0, 1, 2].into()));
    assert_eq!(get("verbose"), R::Bool(true));
    assert_eq!(
        get("modes"),
        R::List(vec![R::EnumNumber(1), R::EnumNumber(0)])
    );
    // An unset optional stays unset (not 0).
    let call = f
        .call("Measure", &wire(&pool, &f, &parameters(vec![], 3, "x")))
        .unwrap();
    assert!(!call.command.has_field_by_name("gain"));
}

#[test]
fn static_constraints_refuse_with_the_parameter() {
    let (f, pool, _) = probe();
    let cases = [
        (
            parameters(vec![Value::Real(11.0)], 1, "x"),
            "Gain",
            "above the maximum 10",
        ),
        (
            parameters(vec![Value::Real(2.0), Value::Real(3.0)], 1, "x"),
            "Gain",
            "more than the maximum 1",
        ),
        (parameters(vec![], 0, "x"), "Repeats", "below the minimum 1"),
        (parameters(vec![], 1, ""), "Label", "below the minimum 1"),
    ];
    for (values, parameter, reason) in cases {
        match f.call("Measure", &wire(&pool, &f, &values)) {
            Err(SilaError::Validation {
                parameter: p,
                message,
            }) => {
                assert_eq!(p, f.parameter_identifier("Measure", parameter));
                assert!(message.contains(reason), "{message} should say {reason}");
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
    let mut bad_mode = parameters(vec![], 1, "x");
    bad_mode[1].1 = s("MODE_LOUD");
    assert!(matches!(
        f.call("Measure", &wire(&pool, &f, &bad_mode)),
        Err(SilaError::Validation { .. })
    ));
}

#[test]
fn a_result_with_enums_and_optionals() {
    let (f, pool, schema) = probe();
    let d = schema
        .pool()
        .get_message_by_name("ppu.sila.test.v1.MeasureResult")
        .unwrap();
    let mut result = DynamicMessage::new(d);
    result.set_field_by_name("mode", R::EnumNumber(1));
    result.set_field_by_name("counts", R::List(vec![R::I32(-1), R::I32(7)]));
    let any = family::pack(&result);
    let m = f.responses(&pool, "Measure", Some(&any), "id").unwrap();
    let decoded = DynamicMessage::decode(m.descriptor(), m.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        value::from_message(&decoded).unwrap(),
        [
            ("ExperimentId".to_owned(), s("id")),
            ("Mode".to_owned(), s("MODE_FAST")),
            ("Gain".to_owned(), Value::List(vec![])),
            (
                "Counts".to_owned(),
                Value::List(vec![Value::Integer(-1), Value::Integer(7)])
            ),
            ("Raw".to_owned(), Value::Binary(vec![])),
        ]
    );
    // An unobservable command has no intermediate responses.
    assert!(f.intermediate(&pool, "Measure", &any).is_err());
}

#[test]
fn probe_reads_the_same_in_the_reference_xslt() {
    let Some(python) = support::python() else {
        return;
    };
    let (f, _, _) = probe();
    let xml = f.feature.to_xml();
    support::validate_fdl(&python, &xml).unwrap();
    let ours = descriptor::file_descriptor(&f.feature).unwrap();
    support::compare_with_xslt(&python, &xml, &ours).unwrap();
}
