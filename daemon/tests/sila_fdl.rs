//! The feature definitions ppud writes by hand (`daemon/src/sila/*.sila.xml`: SiLAService,
//! AuthorizationService, ExperimentQueue) against the second reading: the official
//! `FeatureDefinition.xsd` and the FDL-to-proto XSLT the `sila2` Python package ships, and, for
//! the standard's two core features, the package's own definitions of them (same members, same
//! types: clients compile their stubs from those). Used at test time only, from a venv; without
//! one the tests print a notice and pass (`PPU_SILA_PYTHON`, else `/tmp/silavenv/bin/python`).
//! The generated family features are checked the same way in `ppu-sila`'s own tests.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ppu_sila::fdl::Feature;

const FILES: [(&str, &str); 3] = [
    (
        "SiLAService",
        include_str!("../src/sila/SiLAService.sila.xml"),
    ),
    (
        "AuthorizationService",
        include_str!("../src/sila/AuthorizationService.sila.xml"),
    ),
    (
        "ExperimentQueue",
        include_str!("../src/sila/ExperimentQueue.sila.xml"),
    ),
];

/// The Python with `sila2` and `lxml`, if there is one.
fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("PPU_SILA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/silavenv/bin/python"));
    let ok = Command::new(&candidate)
        .args(["-c", "import sila2, lxml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "NOTICE: skipped: no Python with sila2 and lxml at {} (set PPU_SILA_PYTHON)",
            candidate.display()
        );
    }
    ok.then_some(candidate)
}

/// Runs `script` with `input` on stdin; its stdout, or its stderr as the error.
fn run(python: &PathBuf, script: &str, input: &str) -> Result<String, String> {
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

const VALIDATE: &str = r#"
import os, sys, sila2
from lxml import etree
xsd = os.path.join(os.path.dirname(sila2.__file__), "resources", "xsd", "FeatureDefinition.xsd")
schema = etree.XMLSchema(etree.parse(xsd))
doc = etree.fromstring(sys.stdin.buffer.read())
if not schema.validate(doc):
    print("\n".join(str(e) for e in schema.error_log), file=sys.stderr)
    sys.exit(1)
"#;

const TO_PROTO: &str = r#"
import sys
from sila2.framework.utils import feature_definition_to_proto_string
from lxml import etree
print(feature_definition_to_proto_string(etree.fromstring(sys.stdin.buffer.read())))
"#;

const PACKAGE_FEATURE: &str = r#"
import os, sys, sila2
name = sys.stdin.read().strip()
path = os.path.join(os.path.dirname(sila2.__file__), "features", name.lower(), name + ".sila.xml")
print(open(path, encoding="utf-8").read())
"#;

#[test]
fn the_hand_written_definitions_validate_against_the_official_schema() {
    let Some(python) = python() else { return };
    for (name, xml) in FILES {
        run(&python, VALIDATE, xml).unwrap_or_else(|e| panic!("{name} as written: {e}"));
        // What GetFeatureDefinition sends: the file read and written again.
        let served = Feature::from_xml(xml).expect("reads").to_xml();
        run(&python, VALIDATE, &served).unwrap_or_else(|e| panic!("{name} as served: {e}"));
        let proto = run(&python, TO_PROTO, &served).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            proto.contains(&format!("service {name}")),
            "{name}: the XSLT made no service: {proto}"
        );
    }
    // The check can fail: an element out of the schema's order is refused.
    let broken = FILES[2].1.replacen("<Observable>No</Observable>", "", 1);
    assert!(run(&python, VALIDATE, &broken).is_err());
}

#[test]
fn the_core_features_have_the_members_and_types_of_the_standards_own() {
    let Some(python) = python() else { return };
    for (name, xml) in &FILES[..2] {
        let ours = Feature::from_xml(xml).expect("ours reads");
        let theirs = run(&python, PACKAGE_FEATURE, name).expect("the package ships it");
        let theirs = Feature::from_xml(&theirs).expect("theirs reads");
        assert_eq!(
            ours.fully_qualified_identifier(),
            theirs.fully_qualified_identifier()
        );
        let commands = |f: &Feature| {
            f.commands
                .iter()
                .map(|c| {
                    let types = |els: &[ppu_sila::fdl::Element]| {
                        els.iter()
                            .map(|e| (e.identifier.clone(), e.data_type.clone()))
                            .collect::<Vec<_>>()
                    };
                    (
                        c.identifier.clone(),
                        c.observable,
                        types(&c.parameters),
                        types(&c.responses),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(commands(&ours), commands(&theirs), "{name} commands");
        let properties = |f: &Feature| {
            f.properties
                .iter()
                .map(|p| (p.identifier.clone(), p.observable, p.data_type.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(properties(&ours), properties(&theirs), "{name} properties");
        let metadata = |f: &Feature| {
            f.metadata
                .iter()
                .map(|m| (m.identifier.clone(), m.data_type.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(metadata(&ours), metadata(&theirs), "{name} metadata");
    }
}
