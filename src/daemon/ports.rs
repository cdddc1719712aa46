//! What a port is asked to be, checked once: from the command line (`port
//! add`, the one-port commands) and from JSON-RPC `port_add` params alike.
//! clap uses the same value parsers, so both spellings give the same error.

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use vfrelay_backends::BackendSpec;

use super::rpc::{self, RpcError, SocketAccess};
use crate::frontend::vduse::Attach;
use crate::net::{self, NetConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    VhostUser { path: PathBuf, client: bool },
    Vduse { device: String, attach: Attach },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub kind: Kind,
    pub queues: u16,
    pub queue_size: u16,
    pub mac: Option<[u8; 6]>,
    pub mtu: u16,
    pub backend: BackendSpec,
    /// Owner and mode of a vhost-user server socket (default: root, 0600).
    pub socket_access: SocketAccess,
}

pub const DEFAULT_MTU: u16 = 1500;
pub const DEFAULT_VHOST_USER_QUEUE_SIZE: u16 = 1024;
pub const DEFAULT_VDUSE_QUEUE_SIZE: u16 = 256;

pub fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    s.parse()
        .map_err(|e: vfrelay_backends::Error| e.to_string())
}

pub fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(64..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 64 and 32768"));
    }
    Ok(n as u16)
}

pub fn check_queues(n: u64) -> Result<u16, String> {
    if !(1..=64).contains(&n) {
        return Err(format!("{n} queue pairs: 1 to 64"));
    }
    Ok(n as u16)
}

pub fn check_mtu(n: u64) -> Result<u16, String> {
    if !(68..=9000).contains(&n) {
        return Err(format!("MTU {n}: 68 to 9000"));
    }
    Ok(n as u16)
}

/// Port names appear in logs, JSON and metrics labels: keep them plain.
pub fn check_name(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "port name '{s}': 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(s.to_string())
}

/// Owner and mode are for a socket vfrelay creates: a vhost-user server.
pub fn check_socket_access(kind: &Kind, access: &SocketAccess) -> Result<(), String> {
    match kind {
        _ if access.is_default() => Ok(()),
        Kind::VhostUser { client: false, .. } => Ok(()),
        Kind::VhostUser { client: true, .. } => Err(
            "socket owner and mode go with a socket vfrelay listens on, not with --client".into(),
        ),
        Kind::Vduse { .. } => Err("socket owner and mode go with a vhost-user port".into()),
    }
}

fn attach_name(a: Attach) -> &'static str {
    match a {
        Attach::VirtioVdpa => "virtio-vdpa",
        Attach::VhostVdpa => "vhost-vdpa",
        Attach::None => "none",
    }
}

fn parse_attach(s: &str) -> Result<Attach, String> {
    match s {
        "virtio-vdpa" => Ok(Attach::VirtioVdpa),
        "vhost-vdpa" => Ok(Attach::VhostVdpa),
        "none" => Ok(Attach::None),
        _ => Err(format!(
            "attach '{s}': one of virtio-vdpa, vhost-vdpa, none"
        )),
    }
}

const PARAMS: &[&str] = &[
    "name",
    "vhost_user",
    "client",
    "vduse",
    "attach",
    "queues",
    "queue_size",
    "mac",
    "mtu",
    "backend",
    "socket_owner",
    "socket_mode",
];

impl PortSpec {
    /// `port_add` params; every field checked with the command line's rules.
    pub fn from_params(p: &Value) -> Result<PortSpec, RpcError> {
        let bad = |k: &str, e: String| RpcError::invalid_params(format!("'{k}': {e}"));
        if let Some(obj) = p.as_object() {
            if let Some(k) = obj.keys().find(|k| !PARAMS.contains(&k.as_str())) {
                return Err(RpcError::invalid_params(format!("unknown parameter '{k}'")));
            }
        }
        let name = rpc::require(rpc::param_str(p, "name")?, "name")?;
        let name = check_name(name).map_err(RpcError::invalid_params)?;
        let vhost_user = rpc::param_str(p, "vhost_user")?;
        let vduse = rpc::param_str(p, "vduse")?;
        let client = rpc::param_bool(p, "client")?.unwrap_or(false);
        let attach = rpc::param_str(p, "attach")?;
        let kind = match (vhost_user, vduse) {
            (Some(path), None) => {
                if attach.is_some() {
                    return Err(RpcError::invalid_params("'attach' goes with 'vduse'"));
                }
                if path.is_empty() {
                    return Err(bad("vhost_user", "empty socket path".into()));
                }
                Kind::VhostUser {
                    path: PathBuf::from(path),
                    client,
                }
            }
            (None, Some(dev)) => {
                if client {
                    return Err(RpcError::invalid_params("'client' goes with 'vhost_user'"));
                }
                let attach = match attach {
                    Some(a) => parse_attach(a).map_err(|e| bad("attach", e))?,
                    None => Attach::VirtioVdpa,
                };
                Kind::Vduse {
                    device: dev.to_string(),
                    attach,
                }
            }
            (Some(_), Some(_)) => {
                return Err(RpcError::invalid_params(
                    "a port is either 'vhost_user' or 'vduse', not both",
                ))
            }
            (None, None) => {
                return Err(RpcError::invalid_params(
                    "a port needs 'vhost_user' (a socket path) or 'vduse' (a device name)",
                ))
            }
        };
        let queues = match rpc::param_u64(p, "queues")? {
            Some(n) => check_queues(n).map_err(|e| bad("queues", e))?,
            None => 1,
        };
        if queues > 1 && matches!(kind, Kind::Vduse { .. }) {
            return Err(RpcError::invalid_params(
                "'queues': VDUSE serves one queue pair (the kernel refuses the control queue)",
            ));
        }
        let queue_size = match rpc::param_u64(p, "queue_size")? {
            Some(n) => parse_queue_size(&n.to_string()).map_err(|e| bad("queue_size", e))?,
            None => match kind {
                Kind::VhostUser { .. } => DEFAULT_VHOST_USER_QUEUE_SIZE,
                Kind::Vduse { .. } => DEFAULT_VDUSE_QUEUE_SIZE,
            },
        };
        let mac = rpc::param_str(p, "mac")?
            .map(net::parse_mac)
            .transpose()
            .map_err(|e| bad("mac", e))?;
        let mtu = match rpc::param_u64(p, "mtu")? {
            Some(n) => check_mtu(n).map_err(|e| bad("mtu", e))?,
            None => DEFAULT_MTU,
        };
        let backend = match rpc::param_str(p, "backend")? {
            Some(s) => parse_backend(s).map_err(|e| bad("backend", e))?,
            None => BackendSpec::default(),
        };
        let socket_access = SocketAccess {
            owner: rpc::param_str(p, "socket_owner")?
                .map(rpc::parse_owner)
                .transpose()
                .map_err(|e| bad("socket_owner", e))?,
            mode: rpc::param_str(p, "socket_mode")?
                .map(rpc::parse_mode)
                .transpose()
                .map_err(|e| bad("socket_mode", e))?,
        };
        check_socket_access(&kind, &socket_access).map_err(RpcError::invalid_params)?;
        Ok(PortSpec {
            name,
            kind,
            queues,
            queue_size,
            mac,
            mtu,
            backend,
            socket_access,
        })
    }

    /// The same spec as `port_add` params (what the client sends).
    pub fn to_params(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        match &self.kind {
            Kind::VhostUser { path, client } => {
                m.insert("vhost_user".into(), json!(path.to_string_lossy()));
                m.insert("client".into(), json!(client));
            }
            Kind::Vduse { device, attach } => {
                m.insert("vduse".into(), json!(device));
                m.insert("attach".into(), json!(attach_name(*attach)));
            }
        }
        m.insert("queues".into(), json!(self.queues));
        m.insert("queue_size".into(), json!(self.queue_size));
        if let Some(mac) = &self.mac {
            m.insert("mac".into(), json!(net::format_mac(mac)));
        }
        m.insert("mtu".into(), json!(self.mtu));
        m.insert("backend".into(), json!(self.backend.to_string()));
        if let Some(o) = &self.socket_access.owner {
            m.insert("socket_owner".into(), json!(o.spec));
        }
        if let Some(mode) = self.socket_access.mode_text() {
            m.insert("socket_mode".into(), json!(mode));
        }
        Value::Object(m)
    }

    pub fn net_config(&self, mac: [u8; 6]) -> NetConfig {
        NetConfig {
            mac,
            mtu: self.mtu,
            queue_pairs: self.queues as usize,
            queue_size: self.queue_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(p: Value) -> Result<PortSpec, RpcError> {
        PortSpec::from_params(&p)
    }

    #[test]
    fn params_round_trip_and_defaults() {
        let s = spec(json!({"name": "a", "vhost_user": "/tmp/a.sock"})).unwrap();
        assert_eq!(s.queues, 1);
        assert_eq!(s.queue_size, 1024);
        assert_eq!(s.mtu, 1500);
        assert_eq!(s.backend, BackendSpec::default());
        assert_eq!(spec(s.to_params()).unwrap(), s);
        let s = spec(json!({"name": "d", "vduse": "vd0", "attach": "none",
            "mac": "52:54:00:00:00:02", "backend": "loopback"}))
        .unwrap();
        assert_eq!(s.queue_size, 256);
        assert_eq!(spec(s.to_params()).unwrap(), s);
        let s = spec(json!({"name": "l", "vhost_user": "/tmp/l.sock",
            "socket_owner": "root:root", "socket_mode": "660"}))
        .unwrap();
        let o = s.socket_access.owner.as_ref().unwrap();
        assert_eq!((o.uid, o.gid), (Some(0), Some(0)));
        assert_eq!(s.socket_access.mode, Some(0o660));
        assert_eq!(s.to_params()["socket_mode"], "0660");
        assert_eq!(spec(s.to_params()).unwrap(), s);
    }

    #[test]
    fn bad_params_say_which() {
        for (p, want) in [
            (json!({"vhost_user": "/x"}), "missing 'name'"),
            (json!({"name": "a b", "vhost_user": "/x"}), "port name"),
            (json!({"name": "a"}), "'vhost_user'"),
            (
                json!({"name": "a", "vhost_user": "/x", "vduse": "d"}),
                "not both",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "backend": "nope"}),
                "'backend'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "mac": "01:00:5e:00:00:01"}),
                "'mac'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "queues": 0}),
                "'queues'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "queue_size": 1000}),
                "'queue_size'",
            ),
            (json!({"name": "a", "vhost_user": "/x", "mtu": 20}), "'mtu'"),
            (
                json!({"name": "a", "vhost_user": "/x", "queues": "2"}),
                "'queues'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "color": 1}),
                "unknown parameter 'color'",
            ),
            (
                json!({"name": "a", "vduse": "d", "queues": 2}),
                "one queue pair",
            ),
            (
                json!({"name": "a", "vduse": "d", "attach": "vfio"}),
                "'attach'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "socket_owner": "vfrnosuchuser"}),
                "no user named 'vfrnosuchuser'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "socket_owner": "root:vfrnosuchgrp"}),
                "no group named 'vfrnosuchgrp'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "socket_owner": ":"}),
                "'socket_owner'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "socket_mode": "0800"}),
                "'socket_mode'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "socket_mode": "04755"}),
                "'socket_mode'",
            ),
            (
                json!({"name": "a", "vhost_user": "/x", "client": true, "socket_mode": "0660"}),
                "not with --client",
            ),
            (
                json!({"name": "a", "vduse": "d", "socket_owner": "root"}),
                "vhost-user port",
            ),
        ] {
            let e = spec(p.clone()).unwrap_err();
            assert_eq!(e.code, rpc::INVALID_PARAMS, "{p}");
            assert!(e.message.contains(want), "{p}: {}", e.message);
        }
    }
}
