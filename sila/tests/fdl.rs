//! The FDL writer against the official XSD and the reader against the sila2 package's own
//! feature definitions (read from the installed package, never copied).

mod support;

use ppu_sila::fdl::{Basic, DataType, Feature};

const EVERYTHING: &str = include_str!("data/Everything.sila.xml");

#[test]
fn reads_every_construct() {
    let f = Feature::from_xml(EVERYTHING).unwrap();
    assert_eq!(
        f.fully_qualified_identifier(),
        "org.example/tests/Everything/v2"
    );
    assert_eq!(f.locale, "en-us");
    assert!(
        f.description.starts_with(
            "Exercises every part of the definition language: <escaped> & multi-line\n"
        )
    );
    let run = f.command("RunProgram").unwrap();
    assert!(run.observable);
    assert_eq!(run.parameters.len(), 3);
    assert_eq!(run.intermediate_responses.len(), 1);
    assert_eq!(run.errors, ["DeviceFault"]);
    let DataType::Constrained(inner, c) = &run.parameters[0].data_type else {
        panic!("Segments is constrained");
    };
    assert_eq!(
        **inner,
        DataType::List(Box::new(DataType::Identifier("Segment".into())))
    );
    assert_eq!(c.minimal_element_count, Some(1));
    let DataType::Constrained(_, log) = &run.responses[1].data_type else {
        panic!("Log is constrained");
    };
    assert_eq!(
        log.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
    let temperature = f.data_type_definition("Temperature").unwrap();
    let DataType::Constrained(real, c) = &temperature.data_type else {
        panic!("Temperature is constrained");
    };
    assert_eq!(**real, DataType::Basic(Basic::Real));
    let unit = c.unit.as_ref().unwrap();
    assert_eq!(
        (unit.label.as_str(), unit.factor, unit.offset),
        ("°C", 1.0, 273.15)
    );
    assert_eq!(
        f.resolve(&DataType::Identifier("Temperature".into())),
        Some(&temperature.data_type)
    );
    assert_eq!(f.metadata.len(), 1);
    assert_eq!(f.errors.len(), 1);
}

#[test]
fn writing_then_reading_is_the_identity() {
    let f = Feature::from_xml(EVERYTHING).unwrap();
    assert_eq!(Feature::from_xml(&f.to_xml()).unwrap(), f);
}

#[test]
fn errors_name_where() {
    let broken = EVERYTHING.replace(
        "<Observable>No</Observable>",
        "<Observable>Maybe</Observable>",
    );
    let e = Feature::from_xml(&broken).unwrap_err();
    assert_eq!(e.path, "Command[1]/Observable");
    let broken = EVERYTHING.replace("<Basic>Timestamp</Basic>", "<Basic>Instant</Basic>");
    let e = Feature::from_xml(&broken).unwrap_err();
    assert_eq!(e.path, "Property[1]/DataType/Basic");
    let broken = EVERYTHING.replace(
        "<Identifier>Hold</Identifier>",
        "<Identifier>hold</Identifier>",
    );
    let e = Feature::from_xml(&broken).unwrap_err();
    assert_eq!(
        e.path,
        "DataTypeDefinition[1]/DataType/Structure/Element[1]/Identifier"
    );
    let broken = EVERYTHING.replace("<Label>min</Label>", "<Label>min</Label><Colour/>");
    assert!(
        Feature::from_xml(&broken)
            .unwrap_err()
            .reason
            .contains("Colour")
    );
    assert!(Feature::from_xml("<Feature").is_err());
    assert!(Feature::from_xml("<Other/>").is_err());
}

#[test]
fn data_type_alone_round_trips() {
    let f = Feature::from_xml(EVERYTHING).unwrap();
    for t in [&f.properties[0].data_type, &f.data_types[1].data_type] {
        assert_eq!(&DataType::from_xml(&t.to_xml()).unwrap(), t);
    }
}

#[test]
fn written_fdl_validates_against_the_official_schema() {
    let Some(python) = support::python() else {
        return;
    };
    // The fixture itself is valid (so the check can tell), and so is what we write of it.
    support::validate_fdl(&python, EVERYTHING).unwrap();
    let f = Feature::from_xml(EVERYTHING).unwrap();
    support::validate_fdl(&python, &f.to_xml()).unwrap();
    // And the check can fail.
    let invalid = f.to_xml().replace("<Observable>No</Observable>", "");
    assert!(support::validate_fdl(&python, &invalid).is_err());
}

#[test]
fn reads_and_rewrites_the_sila2_package_features() {
    let Some(python) = support::python() else {
        return;
    };
    let features = support::package_features(&python);
    let names: Vec<&str> = features.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "SiLAService.sila.xml",
        "LockController.sila.xml",
        "AuthorizationService.sila.xml",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    for (name, xml) in &features {
        let f = Feature::from_xml(xml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let written = f.to_xml();
        assert_eq!(Feature::from_xml(&written).unwrap(), f, "{name}");
        support::validate_fdl(&python, &written).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let service = &features
        .iter()
        .find(|(n, _)| n == "SiLAService.sila.xml")
        .unwrap()
        .1;
    let f = Feature::from_xml(service).unwrap();
    assert_eq!(
        f.fully_qualified_identifier(),
        "org.silastandard/core/SiLAService/v1"
    );
    let DataType::List(item) = &f.property("ImplementedFeatures").unwrap().data_type else {
        panic!("ImplementedFeatures is a list");
    };
    let DataType::Constrained(string, c) = &**item else {
        panic!("of constrained strings");
    };
    assert_eq!(**string, DataType::Basic(Basic::String));
    assert_eq!(
        c.fully_qualified_identifier.as_deref(),
        Some("FeatureIdentifier")
    );
}

#[test]
fn an_any_type_validates_against_the_official_schema() {
    let Some(python) = support::python() else {
        return;
    };
    let f = Feature::from_xml(EVERYTHING).unwrap();
    for t in [
        DataType::Basic(Basic::Real),
        f.properties[0].data_type.clone(),
        f.commands[0].parameters[1].data_type.clone(),
    ] {
        support::validate_any_type(&python, &t.to_xml())
            .unwrap_or_else(|e| panic!("{e}\n{}", t.to_xml()));
    }
}
