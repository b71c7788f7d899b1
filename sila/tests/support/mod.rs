//! The second reading: the `sila2` Python package (its XSD, its FDL-to-proto XSLT, its feature
//! files), used at test time only from a venv. Tests that need it print a notice and pass
//! when no such Python is found (`PPU_SILA_PYTHON`, else `/tmp/silavenv/bin/python`).

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The Python with `sila2` and `lxml`, if there is one.
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("PPU_SILA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/silavenv/bin/python"));
    let ok = Command::new(&candidate)
        .args(["-c", "import sila2, lxml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(candidate)
    } else {
        eprintln!(
            "NOTICE: skipped: no Python with sila2 and lxml at {} (set PPU_SILA_PYTHON)",
            candidate.display()
        );
        None
    }
}

/// Runs `script` with `input` on stdin; its stdout, or the failure with stderr.
pub fn run(python: &PathBuf, script: &str, input: &str) -> Result<String, String> {
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

/// The installed sila2 package's directory.
pub fn sila2_dir(python: &PathBuf) -> PathBuf {
    let out = run(
        python,
        "import os, sila2; print(os.path.dirname(sila2.__file__))",
        "",
    )
    .expect("sila2 is importable");
    PathBuf::from(out.trim())
}

/// Validates an FDL document against the package's `FeatureDefinition.xsd` (lxml).
pub fn validate_fdl(python: &PathBuf, xml: &str) -> Result<(), String> {
    let script = r#"
import os, sys, sila2
from lxml import etree
xsd = os.path.join(os.path.dirname(sila2.__file__), "resources", "xsd", "FeatureDefinition.xsd")
schema = etree.XMLSchema(etree.parse(xsd))
doc = etree.fromstring(sys.stdin.buffer.read())
if not schema.validate(doc):
    print("\n".join(str(e) for e in schema.error_log), file=sys.stderr)
    sys.exit(1)
"#;
    run(python, script, xml).map(|_| ())
}

/// The `.proto` text the sila2 package's XSLT makes of an FDL document.
pub fn proto_of(python: &PathBuf, xml: &str) -> Result<String, String> {
    let script = r#"
import sys
from sila2.framework.utils import feature_definition_to_proto_string
from lxml import etree
print(feature_definition_to_proto_string(etree.fromstring(sys.stdin.buffer.read())))
"#;
    run(python, script, xml)
}

/// The sila2 package's own feature definitions (SiLAService, LockController, …).
pub fn package_features(python: &PathBuf) -> Vec<(String, String)> {
    let dir = sila2_dir(python).join("features");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("features directory") {
        let sub = entry.expect("entry").path();
        for file in std::fs::read_dir(&sub).into_iter().flatten().flatten() {
            let path = file.path();
            if path.to_string_lossy().ends_with(".sila.xml") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                out.push((name, std::fs::read_to_string(&path).expect("readable")));
            }
        }
    }
    out.sort();
    out
}

/// Compiles the `.proto` the sila2 package's XSLT makes of `xml` with protoc and compares its
/// messages (names, fields: name, number, label, type) and service (methods: name,
/// input/output types, streaming) with `ours`. Every difference is listed.
pub fn compare_with_xslt(
    python: &PathBuf,
    xml: &str,
    ours: &prost_types::FileDescriptorProto,
) -> Result<(), String> {
    use prost::Message;

    let proto = proto_of(python, xml)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The XSLT imports "SiLAFramework.proto": give it ours (same package and names).
    std::fs::write(
        dir.path().join("SiLAFramework.proto"),
        include_str!("../../proto/sila2/org/silastandard/SiLAFramework.proto"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("Feature.proto"), &proto).map_err(|e| e.to_string())?;
    let set_path = dir.path().join("set.bin");
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(|e| e.to_string())?;
    let out = Command::new(protoc)
        .arg(format!("--proto_path={}", dir.path().display()))
        .arg(format!("--descriptor_set_out={}", set_path.display()))
        .arg("Feature.proto")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "protoc refused the XSLT's proto: {}\n{proto}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let set = prost_types::FileDescriptorSet::decode(
        std::fs::read(&set_path)
            .map_err(|e| e.to_string())?
            .as_slice(),
    )
    .map_err(|e| e.to_string())?;
    let theirs = set
        .file
        .iter()
        .find(|f| f.name() == "Feature.proto")
        .ok_or("no Feature.proto in the set")?;
    let mut differences = Vec::new();
    if theirs.package() != ours.package() {
        differences.push(format!(
            "package {} vs {}",
            theirs.package(),
            ours.package()
        ));
    }
    let mut a = Vec::new();
    let mut b = Vec::new();
    for m in &theirs.message_type {
        flatten(m, "", &mut a);
    }
    for m in &ours.message_type {
        flatten(m, "", &mut b);
    }
    a.sort();
    b.sort();
    diff("message", &a, &b, &mut differences);
    let services = |f: &prost_types::FileDescriptorProto| {
        let mut out = Vec::new();
        for s in &f.service {
            for m in &s.method {
                out.push(format!(
                    "{}.{}({}{}) returns ({}{})",
                    s.name(),
                    m.name(),
                    if m.client_streaming() { "stream " } else { "" },
                    m.input_type(),
                    if m.server_streaming() { "stream " } else { "" },
                    m.output_type()
                ));
            }
        }
        out.sort();
        out
    };
    diff("rpc", &services(theirs), &services(ours), &mut differences);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "XSLT (left) and ours (right) differ:\n{}",
            differences.join("\n")
        ))
    }
}

fn flatten(m: &prost_types::DescriptorProto, prefix: &str, out: &mut Vec<String>) {
    let name = format!("{prefix}{}", m.name());
    let mut line = format!("{name} {{");
    for f in &m.field {
        line.push_str(&format!(
            " {:?} {:?} {} {} = {};",
            f.label(),
            f.r#type(),
            f.type_name(),
            f.name(),
            f.number()
        ));
    }
    line.push_str(" }");
    out.push(line);
    for n in &m.nested_type {
        flatten(n, &format!("{name}."), out);
    }
}

fn diff(kind: &str, theirs: &[String], ours: &[String], out: &mut Vec<String>) {
    for t in theirs {
        if !ours.contains(t) {
            out.push(format!("< {kind} {t}"));
        }
    }
    for o in ours {
        if !theirs.contains(o) {
            out.push(format!("> {kind} {o}"));
        }
    }
}

/// Validates a stand-alone `<DataType>` (an `Any`'s type) against `AnyTypeDataType.xsd`.
pub fn validate_any_type(python: &PathBuf, xml: &str) -> Result<(), String> {
    let script = r#"
import os, sys, sila2
from lxml import etree
xsd = os.path.join(os.path.dirname(sila2.__file__), "resources", "xsd", "AnyTypeDataType.xsd")
schema = etree.XMLSchema(etree.parse(xsd))
doc = etree.fromstring(sys.stdin.buffer.read())
if not schema.validate(doc):
    print("\n".join(str(e) for e in schema.error_log), file=sys.stderr)
    sys.exit(1)
"#;
    run(python, script, xml).map(|_| ())
}
