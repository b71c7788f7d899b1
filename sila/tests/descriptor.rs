//! The Part B mapping, read twice: our descriptors against what protoc makes of the sila2
//! package's XSLT output for the same FDL.

mod support;

use ppu_sila::descriptor;
use ppu_sila::fdl::Feature;

const EVERYTHING: &str = include_str!("data/Everything.sila.xml");

#[test]
fn every_feature_builds_a_pool() {
    let f = Feature::from_xml(EVERYTHING).unwrap();
    let pool = descriptor::pool(std::slice::from_ref(&f)).unwrap();
    let service = pool
        .get_service_by_name("sila2.org.example.tests.everything.v2.Everything")
        .unwrap();
    let names: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
    assert_eq!(
        names,
        [
            "RunProgram",
            "RunProgram_Info",
            "RunProgram_Intermediate",
            "RunProgram_Result",
            "Reset",
            "Subscribe_Temperatures",
            "Get_StartedAt",
            "Get_Anything",
            "Get_FCPAffectedByMetadata_Operator"
        ]
    );
    let parameters = pool
        .get_message_by_name(&descriptor::message_name(&f, "RunProgram_Parameters"))
        .unwrap();
    let options = parameters.get_field_by_name("Options").unwrap();
    assert_eq!(
        options.kind().as_message().unwrap().full_name(),
        "sila2.org.example.tests.everything.v2.RunProgram_Parameters.Options_Struct"
    );
    let segments = parameters.get_field_by_name("Segments").unwrap();
    assert!(segments.is_list());
    assert_eq!(
        segments.kind().as_message().unwrap().full_name(),
        "sila2.org.example.tests.everything.v2.DataType_Segment"
    );
}

#[test]
fn refuses_unknown_types_and_duplicates() {
    let f = Feature::from_xml(&EVERYTHING.replace(
        "<DataTypeIdentifier>Segment</DataTypeIdentifier>",
        "<DataTypeIdentifier>Segmentz</DataTypeIdentifier>",
    ))
    .unwrap();
    let e = descriptor::file_descriptor(&f).unwrap_err();
    assert!(e.reason.contains("unknown data type Segmentz"), "{e}");
    let mut f = Feature::from_xml(EVERYTHING).unwrap();
    f.commands.push(f.commands[1].clone());
    assert!(
        descriptor::file_descriptor(&f)
            .unwrap_err()
            .reason
            .contains("two of command Reset")
    );
}

#[test]
fn metadata_header_names() {
    let f = Feature::from_xml(EVERYTHING).unwrap();
    assert_eq!(
        descriptor::metadata_header(&f, "Operator"),
        "sila-org.example-tests-everything-v2-metadata-operator-bin"
    );
}

#[test]
fn matches_the_reference_xslt() {
    let Some(python) = support::python() else {
        return;
    };
    let mut checked = Vec::new();
    for (name, xml) in support::package_features(&python)
        .into_iter()
        .chain([("Everything.sila.xml".to_owned(), EVERYTHING.to_owned())])
    {
        let f = Feature::from_xml(&xml).unwrap();
        let ours = descriptor::file_descriptor(&f).unwrap();
        support::compare_with_xslt(&python, &xml, &ours).unwrap_or_else(|e| panic!("{name}: {e}"));
        checked.push(name);
    }
    for expected in [
        "SiLAService.sila.xml",
        "LockController.sila.xml",
        "Everything.sila.xml",
    ] {
        assert!(checked.iter().any(|c| c == expected));
    }
}

#[test]
fn the_comparison_can_fail() {
    let Some(python) = support::python() else {
        return;
    };
    let f = Feature::from_xml(EVERYTHING).unwrap();
    let mut ours = descriptor::file_descriptor(&f).unwrap();
    ours.message_type[0].field[0].number = Some(7);
    assert!(support::compare_with_xslt(&python, EVERYTHING, &ours).is_err());
}

#[test]
fn the_access_token_header_is_the_standard_one() {
    let Some(python) = support::python() else {
        return;
    };
    let (_, xml) = support::package_features(&python)
        .into_iter()
        .find(|(n, _)| n == "AuthorizationService.sila.xml")
        .unwrap();
    let f = Feature::from_xml(&xml).unwrap();
    assert_eq!(
        descriptor::metadata_header(&f, "AccessToken"),
        "sila-org.silastandard-core-authorizationservice-v1-metadata-accesstoken-bin"
    );
    let pool = descriptor::pool(std::slice::from_ref(&f)).unwrap();
    let m = pool
        .get_message_by_name(&descriptor::message_name(&f, "Metadata_AccessToken"))
        .unwrap();
    assert_eq!(m.get_field_by_name("AccessToken").unwrap().number(), 1);
}
