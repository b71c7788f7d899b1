//! Every real family's generated feature: valid FDL (official XSD), the same Part B reading as
//! the sila2 package's XSLT, and calls and results translated both ways.

mod support;

use ppu_drivers::analyser::schema as analyser;
use ppu_drivers::furnace::schema as furnace;
use ppu_sila::descriptor;
use ppu_sila::error::SilaError;
use ppu_sila::family::{self, FamilyFeature};
use ppu_sila::fdl::{DataType, Feature};
use ppu_sila::value::{self, Value};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage};

fn schema() -> ppu_schema::Schema {
    ppu_drivers::registry::schema().unwrap()
}

fn feature(family: &str) -> (FamilyFeature, DescriptorPool) {
    let f = FamilyFeature::generate(&schema(), family).unwrap();
    let pool = descriptor::pool(std::slice::from_ref(&f.feature)).unwrap();
    (f, pool)
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn list(items: Vec<Value>) -> Value {
    Value::List(items)
}

fn structure(elements: &[(&str, Value)]) -> Value {
    Value::Structure(
        elements
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

#[test]
fn every_family_generates_a_readable_feature() {
    let schema = schema();
    assert!(schema.families().len() >= 5);
    for f in schema.families() {
        let generated = FamilyFeature::generate(&schema, f.name()).unwrap();
        let xml = generated.feature.to_xml();
        assert_eq!(
            Feature::from_xml(&xml).unwrap(),
            generated.feature,
            "{}",
            f.name()
        );
        descriptor::pool(std::slice::from_ref(&generated.feature)).unwrap();
        assert_eq!(generated.commands.len(), f.commands.len());
    }
}

#[test]
fn every_family_is_valid_fdl_and_reads_the_same_in_the_reference_xslt() {
    let Some(python) = support::python() else {
        return;
    };
    let schema = schema();
    for f in schema.families() {
        let generated = FamilyFeature::generate(&schema, f.name()).unwrap();
        let xml = generated.feature.to_xml();
        support::validate_fdl(&python, &xml).unwrap_or_else(|e| panic!("{}: {e}\n{xml}", f.name()));
        let ours = descriptor::file_descriptor(&generated.feature).unwrap();
        support::compare_with_xslt(&python, &xml, &ours)
            .unwrap_or_else(|e| panic!("{}: {e}", f.name()));
    }
}

#[test]
fn furnace_feature_shape() {
    let (f, _) = feature("furnace");
    assert_eq!(
        f.feature.fully_qualified_identifier(),
        "ppu/devices/Furnace/v1"
    );
    let c = f.feature.command("FurnaceProgram").unwrap();
    assert!(c.observable);
    assert_eq!(c.parameters[0].identifier, "Device");
    assert_eq!(c.parameters[1].identifier, "Segments");
    assert_eq!(c.responses[0].identifier, "ExperimentId");
    assert_eq!(c.errors, ["DeviceFault", "Aborted", "Refused"]);
    // The proto comment is the description.
    assert!(
        c.description.starts_with("A furnace temperature program"),
        "{}",
        c.description
    );
    let ramp = f.feature.data_type_definition("Ramp").unwrap();
    let DataType::Structure(elements) = &ramp.data_type else {
        panic!("Ramp is a structure");
    };
    assert_eq!(elements[0].identifier, "TemperatureC");
    assert_eq!(elements[0].display_name, "Temperature C");
    assert!(elements[0].description.starts_with("Target temperature."));
    let DataType::Constrained(_, c) = &elements[1].data_type else {
        panic!("RateCPerMin is constrained");
    };
    assert_eq!(c.minimal_exclusive.as_deref(), Some("0"));
    assert_eq!(c.unit.as_ref().unwrap().label, "°C/min");
    let pv = f.feature.property("PvC").unwrap();
    assert!(pv.observable);
    assert_eq!(f.readings[0].name, "pv_c");
    let family_command = f.command("FurnaceProgram").unwrap();
    assert_eq!(
        family_command.message,
        "ppu.devices.furnace.v1.FurnaceProgram"
    );
    assert_eq!(family_command.capability, "furnace_program");
}

fn furnace_parameters(device: &str, segments: Vec<Value>) -> Vec<(String, Value)> {
    vec![
        ("Device".into(), s(device)),
        ("Segments".into(), list(segments)),
    ]
}

fn ramp(t: f64, rate: f64) -> Value {
    structure(&[
        (
            "Ramp",
            list(vec![structure(&[
                ("TemperatureC", Value::Real(t)),
                ("RateCPerMin", Value::Real(rate)),
            ])]),
        ),
        ("Hold", list(vec![])),
        ("Step", list(vec![])),
    ])
}

fn hold(seconds: f64) -> Value {
    structure(&[
        ("Ramp", list(vec![])),
        (
            "Hold",
            list(vec![structure(&[("DurationS", Value::Real(seconds))])]),
        ),
        ("Step", list(vec![])),
    ])
}

/// The parameters as they arrive: encoded by a client, decoded by the server.
fn over_the_wire(
    pool: &DescriptorPool,
    f: &FamilyFeature,
    command: &str,
    values: &[(String, Value)],
) -> DynamicMessage {
    let d = pool
        .get_message_by_name(&descriptor::message_name(
            &f.feature,
            &format!("{command}_Parameters"),
        ))
        .unwrap();
    let bytes = value::to_message(&d, values).unwrap().encode_to_vec();
    DynamicMessage::decode(d, bytes.as_slice()).unwrap()
}

#[test]
fn a_furnace_program_call_becomes_the_family_command() {
    let (f, pool) = feature("furnace");
    let params = over_the_wire(
        &pool,
        &f,
        "FurnaceProgram",
        &furnace_parameters("furnace-1", vec![ramp(500.0, 10.0), hold(600.0)]),
    );
    let call = f.call("FurnaceProgram", &params).unwrap();
    assert_eq!(call.device, "furnace-1");
    // Decoded by the family's own generated type: the bytes are the family command's.
    let packed = family::pack(&call.command);
    assert_eq!(
        packed.type_url,
        "type.googleapis.com/ppu.devices.furnace.v1.FurnaceProgram"
    );
    let program = furnace::FurnaceProgram::decode(packed.value.as_slice()).unwrap();
    let expected = furnace::FurnaceProgram {
        segments: vec![
            furnace::FurnaceSegment {
                kind: Some(furnace::furnace_segment::Kind::Ramp(furnace::Ramp {
                    temperature_c: 500.0,
                    rate_c_per_min: 10.0,
                })),
            },
            furnace::FurnaceSegment {
                kind: Some(furnace::furnace_segment::Kind::Hold(furnace::Hold {
                    duration_s: 600.0,
                })),
            },
        ],
    };
    assert_eq!(program, expected);
}

#[test]
fn bad_furnace_calls_are_validation_errors_naming_the_parameter() {
    let (f, pool) = feature("furnace");
    let segments = "ppu/devices/Furnace/v1/Command/FurnaceProgram/Parameter/Segments";
    let cases = [
        (vec![], "fewer than the minimum 1"),
        (
            vec![ramp(500.0, 0.0)],
            "Segments[0].Ramp[0].RateCPerMin: 0 is not above 0",
        ),
        (
            vec![hold(-1.0)],
            "Segments[0].Hold[0].DurationS: -1 is below the minimum 0",
        ),
        (
            vec![structure(&[
                (
                    "Ramp",
                    list(vec![structure(&[
                        ("TemperatureC", Value::Real(1.0)),
                        ("RateCPerMin", Value::Real(1.0)),
                    ])]),
                ),
                (
                    "Hold",
                    list(vec![structure(&[("DurationS", Value::Real(1.0))])]),
                ),
                ("Step", list(vec![])),
            ])],
            "Ramp and Hold are alternatives",
        ),
    ];
    for (segs, reason) in cases {
        let params = over_the_wire(&pool, &f, "FurnaceProgram", &furnace_parameters("", segs));
        match f.call("FurnaceProgram", &params) {
            Err(SilaError::Validation { parameter, message }) => {
                assert_eq!(parameter, segments);
                assert!(message.contains(reason), "{message} should say {reason}");
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
    // The error travels as the standard's ABORTED details.
    let params = over_the_wire(&pool, &f, "FurnaceProgram", &furnace_parameters("", vec![]));
    let e = f.call("FurnaceProgram", &params).unwrap_err();
    assert_eq!(
        SilaError::from_details(e.to_details().as_bytes()).unwrap(),
        e
    );
    assert!(matches!(
        f.call("NoSuchCommand", &params),
        Err(SilaError::UndefinedExecution { .. })
    ));
}

fn point(p: f64, amount: f64) -> analyser::IsothermPoint {
    analyser::IsothermPoint {
        pressure_bar: p,
        p0_bar: 0.0,
        amount_mmol_per_g: amount,
        equilibration_time_s: 30.0,
    }
}

#[test]
fn an_isotherm_result_becomes_the_responses() {
    let (f, pool) = feature("analyser");
    let result = analyser::IsothermResult {
        adsorptive: "CO2".into(),
        temperature_c: 25.0,
        sample_mass_g: 0.1,
        degas_temperature_c: 120.0,
        degas_duration_s: 3600.0,
        points: vec![point(0.1, 0.5), point(1.0, 2.25)],
        instrument: "sim".into(),
    };
    let any = prost_types::Any {
        type_url: "type.googleapis.com/ppu.devices.analyser.v1.IsothermResult".into(),
        value: result.encode_to_vec(),
    };
    let id = "01JEZ0000000000000000000AB";
    let responses = f.responses(&pool, "Isotherm", Some(&any), id).unwrap();
    // Over the wire and back, as a client reads it.
    let decoded =
        DynamicMessage::decode(responses.descriptor(), responses.encode_to_vec().as_slice())
            .unwrap();
    let values = value::from_message(&decoded).unwrap();
    let point_value = |p: f64, a: f64| {
        structure(&[
            ("PressureBar", Value::Real(p)),
            ("P0Bar", Value::Real(0.0)),
            ("AmountMmolPerG", Value::Real(a)),
            ("EquilibrationTimeS", Value::Real(30.0)),
        ])
    };
    let expected: Vec<(String, Value)> = [
        ("ExperimentId", s(id)),
        ("Adsorptive", s("CO2")),
        ("TemperatureC", Value::Real(25.0)),
        ("SampleMassG", Value::Real(0.1)),
        ("DegasTemperatureC", Value::Real(120.0)),
        ("DegasDurationS", Value::Real(3600.0)),
        (
            "Points",
            list(vec![point_value(0.1, 0.5), point_value(1.0, 2.25)]),
        ),
        ("Instrument", s("sim")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(values, expected);

    // One intermediate point.
    let any = prost_types::Any {
        type_url: "type.googleapis.com/ppu.devices.analyser.v1.IsothermPoint".into(),
        value: point(0.5, 1.5).encode_to_vec(),
    };
    let m = f.intermediate(&pool, "Isotherm", &any).unwrap();
    assert_eq!(
        value::from_message(&m).unwrap(),
        [
            ("PressureBar".to_owned(), Value::Real(0.5)),
            ("P0Bar".to_owned(), Value::Real(0.0)),
            ("AmountMmolPerG".to_owned(), Value::Real(1.5)),
            ("EquilibrationTimeS".to_owned(), Value::Real(30.0)),
        ]
    );
    // A result of the wrong type is not silently misread.
    assert!(f.responses(&pool, "Isotherm", Some(&any), id).is_err());
    // No output yet: the experiment id alone, the rest defaults.
    let bare = f.responses(&pool, "Isotherm", None, id).unwrap();
    assert_eq!(
        value::from_message(&bare).unwrap()[0],
        ("ExperimentId".to_owned(), s(id))
    );
}

#[test]
fn readings_are_lists_of_device_values() {
    let (f, pool) = feature("furnace");
    let m = f
        .reading(
            &pool,
            "PvC",
            &[("furnace-1".into(), 512.5), ("furnace-2".into(), 20.0)],
        )
        .unwrap();
    assert_eq!(
        value::from_message(&m).unwrap(),
        [(
            "PvC".to_owned(),
            list(vec![
                structure(&[("Device", s("furnace-1")), ("Value", Value::Real(512.5))]),
                structure(&[("Device", s("furnace-2")), ("Value", Value::Real(20.0))]),
            ])
        )]
    );
}

#[test]
fn units_map_to_si() {
    let c = family::unit("°C");
    assert_eq!((c.factor, c.offset), (1.0, 273.15));
    assert_eq!(c.components[0].si_unit, "Kelvin");
    let flow = family::unit("mL/min");
    assert!((flow.factor - 1e-6 / 60.0).abs() < 1e-20);
    let dims: Vec<(&str, i64)> = flow
        .components
        .iter()
        .map(|u| (u.si_unit.as_str(), u.exponent))
        .collect();
    assert_eq!(dims, [("Meter", 3), ("Second", -1)]);
    let bar = family::unit("bar");
    assert_eq!(bar.factor, 1e5);
    let uptake = family::unit("mmol/g");
    assert_eq!(uptake.factor, 1.0);
    let odd = family::unit("furlongs");
    assert_eq!(odd.label, "furlongs");
    assert_eq!(odd.components[0].si_unit, "Dimensionless");
    assert_eq!(family::upper_camel("temperature_c"), "TemperatureC");
    assert_eq!(family::upper_camel("mfc"), "Mfc");
    assert_eq!(family::display_name("RateCPerMin"), "Rate C Per Min");
}

#[test]
fn display_names_split_words() {
    assert_eq!(family::display_name("FurnaceProgram"), "Furnace Program");
    assert_eq!(family::display_name("P0Bar"), "P0 Bar");
    assert_eq!(family::display_name("AmountMmolPerG"), "Amount Mmol Per G");
}

/// `PPU_SILA_DUMP_FAMILY=furnace cargo test -p ppu-sila --test family dump -- --nocapture` prints a family's FDL.
#[test]
fn dump() {
    if let Ok(family) = std::env::var("PPU_SILA_DUMP_FAMILY") {
        println!("{}", feature(&family).0.feature.to_xml());
    }
}
