//! The features the endpoint serves and the table of their gRPC methods: SiLAService and
//! AuthorizationService (the standard's core features, FDL files here), one feature per device
//! family (generated from its schema by `ppu_sila::family`), and ExperimentQueue (FDL file
//! here). Each method's path maps to its feature, its member, its message types and the kind of
//! call it is for the auth layer's role table.

use std::collections::HashMap;

use ppu_schema::prost_reflect::{DescriptorPool, MessageDescriptor};
use ppu_sila::descriptor::{self, rpc};
use ppu_sila::family::FamilyFeature;
use ppu_sila::fdl::Feature;

use crate::auth::{Access, AuditTarget, MethodTable, Surface};

/// The standard's mandatory feature.
pub(crate) const SILA_SERVICE_FDL: &str = include_str!("SiLAService.sila.xml");
/// The standard's access-token metadata.
pub(crate) const AUTHORIZATION_FDL: &str = include_str!("AuthorizationService.sila.xml");
/// ppu's queue for orchestrators.
pub(crate) const EXPERIMENT_QUEUE_FDL: &str = include_str!("ExperimentQueue.sila.xml");

/// What a served feature is, for dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    SilaService,
    Authorization,
    /// Index into [`Features::families`].
    Family(usize),
    Queue,
}

/// A feature the endpoint serves, with its FDL as sent by GetFeatureDefinition.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub kind: Kind,
    pub feature: Feature,
    pub xml: String,
}

/// Which member of a feature a gRPC method is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Member {
    /// The command call (unobservable: the whole call; observable: its start).
    Command(String),
    Info(String),
    Intermediate(String),
    Result(String),
    Get(String),
    Subscribe(String),
    /// `Get_FCPAffectedByMetadata_<Metadata>`.
    Affected(String),
}

/// One gRPC method of a served feature.
#[derive(Debug, Clone)]
pub(crate) struct Method {
    /// Index into [`Features::served`].
    pub feature: usize,
    pub member: Member,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub streaming: bool,
    pub access: Access,
}

/// Every served feature and method.
#[derive(Debug)]
pub(crate) struct Features {
    pub served: Vec<Served>,
    pub families: Vec<FamilyFeature>,
    pub pool: DescriptorPool,
    /// By path, `/<package>.<Feature>/<Method>`.
    pub methods: HashMap<String, Method>,
}

impl Features {
    /// The features of a daemon built with `schema`'s families.
    pub(crate) fn build(schema: &ppu_schema::Schema) -> Result<Features, String> {
        let fdl =
            |name: &str, xml: &str| Feature::from_xml(xml).map_err(|e| format!("{name}: {e}"));
        let mut all = vec![
            served(Kind::SilaService, fdl("SiLAService", SILA_SERVICE_FDL)?),
            served(
                Kind::Authorization,
                fdl("AuthorizationService", AUTHORIZATION_FDL)?,
            ),
        ];
        let mut families = Vec::new();
        for f in schema.families() {
            // A family without a feature is served over ppu.v1 only; the others still are.
            let ff = match FamilyFeature::generate(schema, f.name()) {
                Ok(ff) => ff,
                Err(e) => {
                    tracing::warn!(family = f.name(), error = %e, "no SiLA feature for this family");
                    continue;
                }
            };
            all.push(served(Kind::Family(families.len()), ff.feature.clone()));
            families.push(ff);
        }
        all.push(served(
            Kind::Queue,
            fdl("ExperimentQueue", EXPERIMENT_QUEUE_FDL)?,
        ));
        let served = all;
        let features: Vec<Feature> = served.iter().map(|s| s.feature.clone()).collect();
        let pool = descriptor::pool(&features).map_err(|e| e.to_string())?;
        let mut methods = HashMap::new();
        for (i, s) in served.iter().enumerate() {
            let service_name = descriptor::service_name(&s.feature);
            let service = pool
                .get_service_by_name(&service_name)
                .ok_or_else(|| format!("no service {service_name} in the features' pool"))?;
            for (name, member) in members(&s.feature) {
                let m = service
                    .methods()
                    .find(|m| m.name() == name)
                    .ok_or_else(|| format!("no method {name} in {service_name}"))?;
                methods.insert(
                    format!("/{service_name}/{name}"),
                    Method {
                        feature: i,
                        access: access(s.kind, &member),
                        member,
                        input: m.input(),
                        output: m.output(),
                        streaming: m.is_server_streaming(),
                    },
                );
            }
        }
        Ok(Features {
            served,
            families,
            pool,
            methods,
        })
    }

    /// The fully qualified identifiers of every served feature (ImplementedFeatures).
    pub(crate) fn identifiers(&self) -> Vec<String> {
        self.served
            .iter()
            .map(|s| s.feature.fully_qualified_identifier())
            .collect()
    }

    /// A served feature by fully qualified identifier.
    pub(crate) fn by_identifier(&self, fqi: &str) -> Option<&Served> {
        self.served
            .iter()
            .find(|s| s.feature.fully_qualified_identifier() == fqi)
    }
}

fn served(kind: Kind, feature: Feature) -> Served {
    Served {
        kind,
        xml: feature.to_xml(),
        feature,
    }
}

/// The gRPC methods Part B gives a feature's members, by method name.
fn members(feature: &Feature) -> Vec<(String, Member)> {
    let mut out = Vec::new();
    for c in &feature.commands {
        let id = &c.identifier;
        out.push((id.clone(), Member::Command(id.clone())));
        if c.observable {
            out.push((rpc::info(id), Member::Info(id.clone())));
            out.push((rpc::result(id), Member::Result(id.clone())));
            if !c.intermediate_responses.is_empty() {
                out.push((rpc::intermediate(id), Member::Intermediate(id.clone())));
            }
        }
    }
    for p in &feature.properties {
        let id = &p.identifier;
        if p.observable {
            out.push((rpc::subscribe_property(id), Member::Subscribe(id.clone())));
        } else {
            out.push((rpc::get_property(id), Member::Get(id.clone())));
        }
    }
    for m in &feature.metadata {
        out.push((
            rpc::affected_by_metadata(&m.identifier),
            Member::Affected(m.identifier.clone()),
        ));
    }
    out
}

/// The role table's view of a member: reads are viewers', commands that run something are
/// submissions, a cancel is a cancel, renaming the server is the admin's.
fn access(kind: Kind, member: &Member) -> Access {
    match (kind, member) {
        (Kind::SilaService, Member::Command(c)) if c == "SetServerName" => Access::Administer,
        (Kind::Family(_), Member::Command(_)) => Access::Submit,
        (Kind::Queue, Member::Command(c)) if c == "SubmitExperiment" => Access::Submit,
        (Kind::Queue, Member::Command(c)) if c == "CancelExperiment" => Access::Cancel,
        _ => Access::Read,
    }
}

/// The header of the AccessToken metadata: `sila-`, the metadata's fully qualified identifier
/// in lower case with `/` as `-`, `-bin` (checked against `descriptor::metadata_header` in the
/// tests).
pub(crate) const ACCESS_TOKEN_HEADER: &str =
    "sila-org.silastandard-core-authorizationservice-v1-metadata-accesstoken-bin";

/// The endpoint's method table for the auth layer.
pub(crate) struct SilaMethods {
    /// (path, access, audit filing) of every method.
    by_path: HashMap<String, (Access, AuditTarget)>,
    /// Reads standard clients make without metadata (see [`Surface::TokenOptional`]):
    /// SiLAService's reads and `Get_FCPAffectedByMetadata_AccessToken`, and the follow-up
    /// calls of command executions.
    token_optional: std::collections::HashSet<String>,
}

impl SilaMethods {
    pub(crate) fn new(features: &Features) -> SilaMethods {
        let by_path = features
            .methods
            .iter()
            .map(|(path, m)| {
                let filed = match (m.access, features.served[m.feature].kind) {
                    (Access::Submit | Access::Cancel, _) => AuditTarget::Experiment,
                    _ => AuditTarget::Neither,
                };
                (path.clone(), (m.access, filed))
            })
            .collect();
        let token_optional = features
            .methods
            .iter()
            .filter(|(_, m)| {
                m.access == Access::Read
                    && (matches!(
                        features.served[m.feature].kind,
                        Kind::SilaService | Kind::Authorization
                    ) || matches!(
                        m.member,
                        Member::Info(_) | Member::Intermediate(_) | Member::Result(_)
                    ))
            })
            .map(|(path, _)| path.clone())
            .collect();
        SilaMethods {
            by_path,
            token_optional,
        }
    }
}

impl MethodTable for SilaMethods {
    fn access(&self, path: &str) -> Access {
        self.by_path.get(path).map_or(Access::Unlisted, |(a, _)| *a)
    }

    fn surface(&self, path: &str) -> Surface {
        if self.token_optional.contains(path) {
            Surface::TokenOptional
        } else {
            Surface::Api
        }
    }

    fn audit_target(&self, path: &str) -> AuditTarget {
        self.by_path
            .get(path)
            .map_or(AuditTarget::Neither, |(_, t)| *t)
    }

    /// A SiLA error is a base64 `SiLAError`; the audit record keeps its text.
    fn audit_message(&self, message: &str) -> String {
        match ppu_sila::error::SilaError::from_details(message.as_bytes()) {
            Ok(e) => e.to_string(),
            Err(_) => message.to_owned(),
        }
    }

    fn credential_headers(&self) -> &[&'static str] {
        &[ACCESS_TOKEN_HEADER]
    }

    /// The AccessToken metadata: a serialized `Metadata_AccessToken { String AccessToken = 1 }`
    /// (gRPC binary metadata, base64 on the wire).
    fn token(&self, headers: &tonic::codegen::http::HeaderMap) -> Result<Option<String>, ()> {
        if !headers.contains_key(ACCESS_TOKEN_HEADER) {
            return Ok(None);
        }
        let map = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let Some(value) = map.get_bin(ACCESS_TOKEN_HEADER) else {
            return Ok(None);
        };
        let bytes = value.to_bytes().map_err(|_| ())?;
        let token = access_token(&bytes).ok_or(())?;
        Ok(Some(token))
    }
}

/// The token in a serialized `Metadata_AccessToken`: field 1 (`AccessToken`, a
/// `sila2.org.silastandard.String`) whose field 1 is the text.
fn access_token(bytes: &[u8]) -> Option<String> {
    let outer = ppu_schema::wire::len_fields(bytes)?;
    let wrapped = outer.iter().find(|f| f.number == 1)?;
    let inner = ppu_schema::wire::len_fields(wrapped.payload)?;
    let text = inner.iter().find(|f| f.number == 1)?;
    let token = std::str::from_utf8(text.payload).ok()?.trim().to_owned();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_token_is_read_from_its_metadata_message() {
        let token = b"ppu_secret";
        let mut inner = vec![0x0a, token.len() as u8];
        inner.extend_from_slice(token);
        let mut outer = vec![0x0a, inner.len() as u8];
        outer.extend_from_slice(&inner);
        assert_eq!(access_token(&outer).as_deref(), Some("ppu_secret"));
        assert_eq!(access_token(&[0x0a, 0x00]), None);
        assert_eq!(access_token(&[0xff]), None);
    }

    #[test]
    fn the_hand_written_features_read() {
        for xml in [SILA_SERVICE_FDL, AUTHORIZATION_FDL, EXPERIMENT_QUEUE_FDL] {
            Feature::from_xml(xml).expect("reads");
        }
        let auth = Feature::from_xml(AUTHORIZATION_FDL).expect("reads");
        assert_eq!(
            descriptor::metadata_header(&auth, "AccessToken"),
            ACCESS_TOKEN_HEADER
        );
    }
}
