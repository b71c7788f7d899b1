//! The standard's core features: SiLAService (who the server is, which features it has, their
//! definitions; the name a client sets and the UUID made at first start are kept in the store)
//! and AuthorizationService (which calls its AccessToken metadata affects).

use std::sync::{Arc, Mutex, PoisonError};

use ppu_schema::prost_reflect::DynamicMessage;
use ppu_sila::error::SilaError;
use tonic::Status;

use super::endpoint::Ctx;
use super::errors::{defined, status, undefined};
use super::features::{Kind, Member, Method};
use super::values::{Basic, Field, encode, string};
use crate::auth::Caller;
use crate::store::{Store, StoreError};

/// SiLAService.ServerType of ppud.
pub const SERVER_TYPE: &str = "PhysicsProcessingUnit";
const SERVER_DESCRIPTION: &str = "ppu lab daemon: a durable, checked and journaled experiment \
    queue in front of a lab's devices. Every device family is a feature whose commands become \
    experiments in the queue; ExperimentQueue submits and follows whole experiments.";
/// Store settings.
const UUID_KEY: &str = "sila.server_uuid";
const NAME_KEY: &str = "sila.server_name";
/// SiLAService.ServerName's constraint.
const MAX_NAME_CHARS: usize = 255;

/// The server's identity: a UUID made once and kept, and a name a client may change.
#[derive(Debug)]
pub(crate) struct Identity {
    pub uuid: String,
    name: Mutex<String>,
}

impl Identity {
    /// The stored identity; a new UUID is made and stored at the first start.
    pub(crate) async fn load(
        store: &Arc<Store>,
        default_name: &str,
    ) -> Result<Identity, StoreError> {
        let uuid = match store.setting(UUID_KEY)? {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => {
                let uuid = new_uuid();
                let value = uuid.clone();
                store
                    .write_async(move |w| w.put_setting(UUID_KEY, value.as_bytes()))
                    .await?;
                uuid
            }
        };
        let name = match store.setting(NAME_KEY)? {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => default_name.to_owned(),
        };
        Ok(Identity {
            uuid,
            name: Mutex::new(name),
        })
    }

    pub(crate) fn name(&self) -> String {
        self.name
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn set_name(&self, store: &Arc<Store>, name: String) -> Result<(), StoreError> {
        let value = name.clone();
        store
            .write_async(move |w| w.put_setting(NAME_KEY, value.as_bytes()))
            .await?;
        *self.name.lock().unwrap_or_else(PoisonError::into_inner) = name;
        Ok(())
    }
}

/// A random (version 4) UUID from the OS's random source; from a fresh ULID's bits if that
/// cannot be read.
fn new_uuid() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        b = ulid::Ulid::new().0.to_be_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::auth::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Ctx {
    pub(crate) async fn sila_service(
        &self,
        method: &Method,
        _caller: &Caller,
        msg: &DynamicMessage,
    ) -> Result<Vec<u8>, Status> {
        let out = &method.output;
        let one =
            |name: &str, v: String| Ok(encode(out, vec![(name, Field::One(Basic::String(v)))]));
        let fqi = self.features.served[method.feature]
            .feature
            .fully_qualified_identifier();
        match &method.member {
            Member::Get(p) => match p.as_str() {
                "ServerName" => one(p, self.identity.name()),
                "ServerType" => one(p, SERVER_TYPE.to_owned()),
                "ServerUUID" => one(p, self.identity.uuid.clone()),
                "ServerDescription" => one(p, SERVER_DESCRIPTION.to_owned()),
                "ServerVersion" => one(p, env!("CARGO_PKG_VERSION").to_owned()),
                "ServerVendorURL" => one(p, env!("CARGO_PKG_REPOSITORY").to_owned()),
                "ImplementedFeatures" => Ok(encode(
                    out,
                    vec![(
                        p,
                        Field::List(
                            self.features
                                .identifiers()
                                .into_iter()
                                .map(Basic::String)
                                .collect(),
                        ),
                    )],
                )),
                other => Err(Status::unimplemented(format!("SiLAService.{other}"))),
            },
            Member::Command(c) if c == "GetFeatureDefinition" => {
                let wanted = string(msg, "FeatureIdentifier").unwrap_or_default();
                match self.features.by_identifier(&wanted) {
                    Some(s) => one("FeatureDefinition", s.xml.clone()),
                    None => Err(defined(
                        &fqi,
                        "UnimplementedFeature",
                        format!(
                            "no feature {wanted:?} here; ImplementedFeatures lists {}",
                            self.features.identifiers().join(", ")
                        ),
                    )),
                }
            }
            Member::Command(c) if c == "SetServerName" => {
                let name = string(msg, "ServerName").unwrap_or_default();
                let chars = name.chars().count();
                if name.trim().is_empty() || chars > MAX_NAME_CHARS {
                    return Err(status(SilaError::Validation {
                        parameter: format!("{fqi}/Command/SetServerName/Parameter/ServerName"),
                        message: format!(
                            "ServerName: {chars} characters; it must be 1 to {MAX_NAME_CHARS}"
                        ),
                    }));
                }
                self.identity
                    .set_name(self.scheduler.store(), name)
                    .await
                    .map_err(|e| undefined(e.to_string()))?;
                Ok(encode(out, Vec::new()))
            }
            other => Err(Status::unimplemented(format!("SiLAService {other:?}"))),
        }
    }

    /// `Get_FCPAffectedByMetadata_AccessToken`: every feature that runs or reads the lab (all
    /// but the two core features) takes the token.
    pub(crate) fn authorization(&self, method: &Method) -> Result<Vec<u8>, Status> {
        let affected = self
            .features
            .served
            .iter()
            .filter(|s| !matches!(s.kind, Kind::SilaService | Kind::Authorization))
            .map(|s| Basic::String(s.feature.fully_qualified_identifier()))
            .collect();
        let Some(field) = method.output.fields().next() else {
            return Err(Status::internal("affected calls: no response field"));
        };
        Ok(encode(
            &method.output,
            vec![(field.name(), Field::List(affected))],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_uuids_are_version_4_and_distinct() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
