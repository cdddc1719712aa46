//! Replays every committed fuzz input on stable: the seed corpora
//! (`fuzz/corpus/<target>/`) and every input a fuzzer once crashed on
//! (`fuzz/regressions/<target>/`), through the same check function the
//! fuzz target runs (`vfrelay::fuzzing`). A finding fixed in src gets its
//! input committed there, so it stays fixed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The vhost-user check counts the process's open fds: nothing else in
/// this binary may open one meanwhile (nor rewrite a corpus being read).
static SERIAL: Mutex<()> = Mutex::new(());

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut v = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            if p.is_file() {
                let data = std::fs::read(&p).unwrap();
                v.push((p, data));
            }
        }
    }
    v
}

fn replay(target: &str, check: fn(&[u8])) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let all = inputs(target);
    assert!(!all.is_empty(), "no inputs for {target}");
    for (path, data) in all {
        eprintln!("{}", path.display());
        check(&data);
    }
}

#[test]
fn ring_inputs() {
    replay("ring", vfrelay::fuzzing::ring);
}

#[test]
fn vhost_user_inputs() {
    replay("vhost_user", vfrelay::fuzzing::vhost_user);
}

/// The committed seed corpora are what `vfrelay::fuzzing::seeds` writes
/// (`VFRELAY_WRITE_SEEDS=1` rewrites them).
#[test]
fn seed_corpora_are_current() {
    // Not while another test reads the corpus this may rewrite.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = std::env::var_os("VFRELAY_WRITE_SEEDS").is_some_and(|v| v == "1");
    for (target, name, bytes) in vfrelay::fuzzing::seeds::all() {
        let path = root.join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is not what the seed generator writes (VFRELAY_WRITE_SEEDS=1 cargo test --test fuzz_regressions)",
            path.display()
        );
    }
}
