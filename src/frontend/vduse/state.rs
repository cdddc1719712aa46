//! What vfrelay records of each VDUSE device it created, one small file per
//! device in `/run/vfrelay/vduse/NAME` (tmpfs: gone at reboot, like the
//! devices): that the device is ours, what it was created with, and the
//! status the driver last set, which the kernel has no call to read back.
//! A vfrelay that starts and finds its device left behind by a killed one
//! reads this to decide whether it may take the device over (see
//! `Port::new`). DPDK 24.11 keeps the same kind of file for the same reason
//! (in its runtime directory, with ring indices too; ours come from the
//! used ring).

use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

const DIR: &str = "/run/vfrelay/vduse";
const MAGIC: &str = "vfrelay-vduse 1";

/// One device's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The vfrelay that last served the device.
    pub pid: u32,
    /// What CREATE_DEV fixed: features, config space, queue size.
    pub features: u64,
    pub config: Vec<u8>,
    pub queue_size: u16,
    /// The status the driver last set (answered OK).
    pub status: u8,
}

impl Record {
    /// Whether a device created with `self` is what `want` would create.
    pub fn same_device(&self, want: &Record) -> bool {
        self.features == want.features
            && self.config == want.config
            && self.queue_size == want.queue_size
    }

    fn encode(&self) -> String {
        let mut cfg = String::new();
        for b in &self.config {
            let _ = write!(cfg, "{b:02x}");
        }
        format!(
            "{MAGIC}\npid={}\nfeatures={:#x}\nconfig={cfg}\nqueue_size={}\nstatus={:#x}\n",
            self.pid, self.features, self.queue_size, self.status
        )
    }

    fn parse(s: &str) -> Result<Record, String> {
        let mut lines = s.lines();
        if lines.next() != Some(MAGIC) {
            return Err("not a vfrelay VDUSE record".into());
        }
        let (mut pid, mut features, mut config, mut qs, mut status) =
            (None, None, None, None, None);
        let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16);
        for l in lines {
            let (k, v) = l.split_once('=').ok_or(format!("bad line '{l}'"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{k}: {e}");
            match k {
                "pid" => pid = Some(v.parse::<u32>().map_err(|e| bad(&e))?),
                "features" => features = Some(hex(v).map_err(|e| bad(&e))?),
                "queue_size" => qs = Some(v.parse::<u16>().map_err(|e| bad(&e))?),
                "status" => {
                    status = Some(u8::try_from(hex(v).map_err(|e| bad(&e))?).map_err(|e| bad(&e))?)
                }
                "config" => {
                    if v.len() % 2 != 0 || v.len() > 2 * 4096 {
                        return Err(bad(&"odd or oversized hex"));
                    }
                    let b: Result<Vec<u8>, _> = (0..v.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&v[i..i + 2], 16))
                        .collect();
                    config = Some(b.map_err(|e| bad(&e))?);
                }
                _ => {}
            }
        }
        let miss = |k: &str| format!("{k} missing");
        Ok(Record {
            pid: pid.ok_or_else(|| miss("pid"))?,
            features: features.ok_or_else(|| miss("features"))?,
            config: config.ok_or_else(|| miss("config"))?,
            queue_size: qs.ok_or_else(|| miss("queue_size"))?,
            status: status.ok_or_else(|| miss("status"))?,
        })
    }
}

/// Where the records live.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Default for Store {
    fn default() -> Self {
        Store { dir: DIR.into() }
    }
}

impl Store {
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn at(dir: PathBuf) -> Store {
        Store { dir }
    }

    #[cfg(test)]
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `name`'s record: a temporary file renamed over the old one,
    /// so a crash leaves the old record or the new, never half of one.
    pub fn write(&self, name: &str, r: &Record) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        // Parents (/run/vfrelay) with the default mode, as the daemon makes
        // them (sockets there must stay reachable); only our own leaf 0700.
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut f, r.encode().as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, self.path(name))
    }

    /// `name`'s record; Ok(None) if there is none.
    pub fn read(&self, name: &str) -> io::Result<Option<Record>> {
        match std::fs::read_to_string(self.path(name)) {
            Ok(s) => Record::parse(&s)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            pid: 42,
            features: 0x3_0001_0028,
            config: vec![0x52, 0x54, 0, 0xa1, 0xb2, 1, 1, 0, 1, 0, 0xdc, 5],
            queue_size: 256,
            status: 0xf,
        }
    }

    #[test]
    fn a_record_round_trips() {
        let d = tempdir();
        let s = Store::at(d.clone());
        assert_eq!(s.read("vd0").unwrap(), None);
        s.write("vd0", &rec()).unwrap();
        assert_eq!(s.read("vd0").unwrap(), Some(rec()));
        let mut r = rec();
        r.status = 0;
        s.write("vd0", &r).unwrap();
        assert_eq!(s.read("vd0").unwrap().unwrap().status, 0);
        s.remove("vd0");
        assert_eq!(s.read("vd0").unwrap(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_records_are_errors_not_devices() {
        for bad in [
            "",
            "something else\npid=1\n",
            "vfrelay-vduse 1\npid=1\n",
            "vfrelay-vduse 1\npid=x\nfeatures=0x1\nconfig=\nqueue_size=1\nstatus=0\n",
            "vfrelay-vduse 1\npid=1\nfeatures=0x1\nconfig=abc\nqueue_size=1\nstatus=0\n",
            "vfrelay-vduse 1\npid=1\nfeatures=0x1\nconfig=\nqueue_size=1\nstatus=0x100\n",
        ] {
            assert!(Record::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Record::parse(&rec().encode()).is_ok());
    }

    #[test]
    fn same_device_ignores_pid_and_status() {
        let mut r = rec();
        r.pid = 7;
        r.status = 0;
        assert!(r.same_device(&rec()));
        r.config[0] ^= 1;
        assert!(!r.same_device(&rec()));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vfx-vduse-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
