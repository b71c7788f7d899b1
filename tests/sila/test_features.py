"""SiLAService: ppud lists its features and serves every feature definition, each valid
against the official FDL schema (the XSD the `sila2` package ships)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
import sila2
from conftest import Daemon, sila_client
from lxml import etree
from sila2.client import SilaClient

XSD = Path(sila2.__file__).parent / "resources" / "xsd" / "FeatureDefinition.xsd"
FDL_NS = "http://www.sila-standard.org"

EXPECTED = {
    "org.silastandard/core/SiLAService/v1",
    "org.silastandard/core/AuthorizationService/v1",
    "ppu/queue/ExperimentQueue/v1",
    "ppu/devices/Furnace/v1",
    "ppu/devices/Analyser/v1",
}


@pytest.fixture(scope="module")
def schema() -> etree.XMLSchema:
    assert XSD.is_file(), f"the sila2 package ships no FDL schema at {XSD}"
    return etree.XMLSchema(etree.parse(str(XSD)))


def test_lists_features_and_every_definition_validates(
    client: SilaClient, schema: etree.XMLSchema
) -> None:
    features = set(client.SiLAService.ImplementedFeatures.get())
    missing = EXPECTED - features
    assert not missing, f"ppud does not implement {missing}; it lists {sorted(features)}"
    # One feature per device family of the dev lab (at least furnace and analyser), each
    # generated: originator ppu, category devices.
    families = {f for f in features if f.startswith("ppu/devices/")}
    assert len(families) >= 2, families
    for fid in sorted(features):
        fdl = client.SiLAService.GetFeatureDefinition(fid).FeatureDefinition
        doc = etree.fromstring(fdl.encode())
        if not schema.validate(doc):
            errors = "\n".join(f"  line {e.line}: {e.message}" for e in schema.error_log)
            pytest.fail(f"FDL of {fid} does not validate against {XSD.name}:\n{errors}")
        root = doc
        assert root.tag == f"{{{FDL_NS}}}Feature"
        originator, category, identifier, version = fid.split("/")
        assert root.get("Originator") == originator
        assert root.get("Category", "none") == category
        assert root.findtext(f"{{{FDL_NS}}}Identifier") == identifier
        assert version == "v" + root.get("FeatureVersion", "").split(".")[0]
        # The client loaded it: every feature is reachable by its identifier.
        assert getattr(client, identifier) is not None


def test_generated_family_features_have_the_schemas_commands(client: SilaClient) -> None:
    furnace = client.SiLAService.GetFeatureDefinition("ppu/devices/Furnace/v1").FeatureDefinition
    doc = etree.fromstring(furnace.encode())
    ns = {"s": FDL_NS}
    commands = {
        c.findtext("s:Identifier", namespaces=ns): c for c in doc.findall("s:Command", ns)
    }
    assert "FurnaceProgram" in commands, sorted(commands)
    program = commands["FurnaceProgram"]
    assert program.findtext("s:Observable", namespaces=ns) == "Yes"
    params = [p.findtext("s:Identifier", namespaces=ns) for p in program.findall("s:Parameter", ns)]
    assert params[0] == "Device" and "Segments" in params, params
    responses = [r.findtext("s:Identifier", namespaces=ns) for r in program.findall("s:Response", ns)]
    assert "ExperimentId" in responses, responses
    errors = {e.findtext("s:Identifier", namespaces=ns) for e in doc.findall("s:DefinedExecutionError", ns)}
    assert {"DeviceFault", "Aborted", "Refused"} <= errors, errors
    # Units travel as Unit constraints: °C somewhere in the program's parameters.
    assert b"Unit" in etree.tostring(program)

    analyser = client.SiLAService.GetFeatureDefinition("ppu/devices/Analyser/v1").FeatureDefinition
    doc = etree.fromstring(analyser.encode())
    iso = next(
        c for c in doc.findall("s:Command", ns) if c.findtext("s:Identifier", namespaces=ns) == "Isotherm"
    )
    assert iso.findtext("s:Observable", namespaces=ns) == "Yes"
    assert iso.findall("s:IntermediateResponse", ns), "Isotherm has no intermediate responses"
    # Readings are observable properties.
    props = {
        p.findtext("s:Identifier", namespaces=ns): p.findtext("s:Observable", namespaces=ns)
        for p in doc.findall("s:Property", ns)
    }
    assert props and all(v == "Yes" for v in props.values()), props


def test_server_identity(client: SilaClient) -> None:
    s = client.SiLAService
    assert s.ServerType.get() == "PhysicsProcessingUnit"
    UUID(s.ServerUUID.get())  # a well-formed UUID
    assert s.ServerName.get()
    assert s.ServerVersion.get()
    assert s.ServerVendorURL.get().startswith("http")


def test_uuid_and_name_survive_a_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.start()
    try:
        c = sila_client(d)
        uuid = c.SiLAService.ServerUUID.get()
        c.SiLAService.SetServerName("bench-3 ppu")
        c.close()
        d.restart()
        c = sila_client(d)
        assert c.SiLAService.ServerUUID.get() == uuid
        assert c.SiLAService.ServerName.get() == "bench-3 ppu"
        c.close()
    finally:
        d.stop()
