//! `--state FILE`: the port table on disk, so that a daemon restarted by
//! its supervisor (or after a crash) brings every port back by itself.
//!
//! The file holds each switch as its `switch_add` params and each port as
//! its `port_add` params, in the order they were added, with the MAC the
//! daemon picked filled in (a guest, and the network, see the same address
//! after the restart). Switches come back before ports, which may join them. It is replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory),
//! so a crash at any point leaves either the old table or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Format version: bumped if the layout ever changes incompatibly.
const VERSION: u64 = 1;

pub struct StateFile {
    path: PathBuf,
}

/// What the file holds: `switch_add` and `port_add` params.
#[derive(Debug, Default, PartialEq)]
pub struct Saved {
    pub switches: Vec<Value>,
    pub ports: Vec<Value>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> StateFile {
        StateFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ports saved, as `port_add` params; none if the file does not
    /// exist yet (first start). A file that cannot be read or understood is
    /// an error: it is left as it is for the operator, never overwritten.
    pub fn load(&self) -> Result<Saved, String> {
        let what = |e: &dyn std::fmt::Display| format!("state file {}: {e}", self.path.display());
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(e) => return Err(what(&e)),
        };
        let doc: Value = serde_json::from_str(&text).map_err(|e| what(&e))?;
        match doc.get("version").and_then(Value::as_u64) {
            Some(VERSION) => {}
            Some(v) => return Err(what(&format!("version {v}, this vfrelay reads {VERSION}"))),
            None => return Err(what(&"no \"version\": not a vfrelay state file")),
        }
        let ports = doc
            .get("ports")
            .and_then(Value::as_array)
            .ok_or_else(|| what(&"no \"ports\" list"))?;
        if let Some(p) = ports.iter().find(|p| !p.is_object()) {
            return Err(what(&format!("a port is not an object: {p}")));
        }
        // Absent in files written before switches existed.
        let switches = match doc.get("switches") {
            None => Vec::new(),
            Some(Value::Array(v)) if v.iter().all(Value::is_object) => v.clone(),
            Some(v) => return Err(what(&format!("\"switches\" is not a list of objects: {v}"))),
        };
        Ok(Saved {
            switches,
            ports: ports.clone(),
        })
    }

    /// Replace the file with `switches` and `ports` (`switch_add` and
    /// `port_add` params).
    pub fn save(&self, switches: &[Value], ports: &[Value]) -> io::Result<()> {
        let doc = json!({ "version": VERSION, "switches": switches, "ports": ports });
        let mut text = serde_json::to_string_pretty(&doc).map_err(io::Error::other)?;
        text.push('\n');
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                // Socket paths and device names: nobody else's business.
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // The rename itself reaches the disk only with the directory. The
        // new table is in place either way, so a failure here is only
        // warned about (undoing the change would leave file and daemon
        // disagreeing).
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            log::warn!(
                "state file {}: syncing its directory: {e}",
                self.path.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vfrelay-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn missing_file_is_an_empty_table_and_saves_round_trip() {
        let d = temp_dir();
        let s = StateFile::new(d.join("ports.json"));
        assert_eq!(s.load().unwrap(), Saved::default());
        let ports = vec![
            json!({"name": "a", "vhost_user": "/x.sock"}),
            json!({"name": "b"}),
        ];
        let switches = vec![json!({"name": "sw0", "uplink": "tap,ifname=u0"})];
        s.save(&switches, &ports).unwrap();
        assert_eq!(s.load().unwrap(), Saved { switches, ports });
        // A file from before switches: its ports.
        fs::write(s.path(), "{\"version\": 1, \"ports\": [{\"name\": \"a\"}]}").unwrap();
        assert_eq!(s.load().unwrap().ports, vec![json!({"name": "a"})]);
        let mode = fs::metadata(s.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(!d.join("ports.json.tmp").exists(), "temporary file left");
        s.save(&[], &[]).unwrap();
        assert_eq!(s.load().unwrap(), Saved::default());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_that_is_not_ours_is_refused_and_left_alone() {
        let d = temp_dir();
        let p = d.join("ports.json");
        let s = StateFile::new(p.clone());
        for (text, needle) in [
            ("{not json", "state file"),
            ("{\"ports\": []}", "version"),
            ("{\"version\": 99, \"ports\": []}", "version 99"),
            ("{\"version\": 1}", "ports"),
            ("{\"version\": 1, \"ports\": [1]}", "not an object"),
            (
                "{\"version\": 1, \"ports\": [], \"switches\": 1}",
                "switches",
            ),
        ] {
            fs::write(&p, text).unwrap();
            let e = s.load().unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
            assert_eq!(fs::read_to_string(&p).unwrap(), text);
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
