//! SiLA 2 discovery: the server advertised as `_sila._tcp.local.` over mDNS, its UUID as the
//! instance name, TXT `version`, `server_name` and `description` (SiLA 2 Part B,
//! "Discovery"). Only when `[sila] mdns = true` (`ppud dev`: on); a loopback listener is
//! advertised on the loopback interface only, as only this host can reach it.

use std::net::SocketAddr;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

/// The SiLA service type.
pub const SERVICE_TYPE: &str = "_sila._tcp.local.";

/// A running advertisement; withdrawn (and the responder stopped) when dropped.
pub struct Advert {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advert")
            .field("fullname", &self.fullname)
            .finish()
    }
}

impl Advert {
    /// Advertises the server `uuid` named `name` listening on `addr`.
    pub fn start(uuid: &str, name: &str, addr: SocketAddr) -> Result<Advert, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        let host = format!("ppud-{}.local.", &uuid[..uuid.len().min(8)]);
        let description = format!("{} {}", super::SERVER_TYPE, env!("CARGO_PKG_VERSION"));
        let txt = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("server_name", name),
            ("description", description.as_str()),
        ];
        let info = match addr.ip() {
            ip if ip.is_loopback() => {
                daemon.disable_interface(IfKind::All)?;
                daemon.enable_interface(if ip.is_ipv4() {
                    IfKind::LoopbackV4
                } else {
                    IfKind::LoopbackV6
                })?;
                ServiceInfo::new(SERVICE_TYPE, uuid, &host, ip, addr.port(), &txt[..])?
            }
            ip if ip.is_unspecified() => {
                ServiceInfo::new(SERVICE_TYPE, uuid, &host, "", addr.port(), &txt[..])?
                    .enable_addr_auto()
            }
            ip => ServiceInfo::new(SERVICE_TYPE, uuid, &host, ip, addr.port(), &txt[..])?,
        };
        let fullname = info.get_fullname().to_owned();
        daemon.register(info)?;
        tracing::info!(instance = %fullname, "advertising the SiLA server over mDNS");
        Ok(Advert { daemon, fullname })
    }
}

impl Drop for Advert {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
