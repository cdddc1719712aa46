//! contrib/systemd/vfrelay.service is a unit systemd accepts as written:
//! `systemd-analyze verify` (with ExecStart pointed at this build's binary)
//! has nothing to say about it, every capability it names exists, and its
//! paths agree with the directories systemd makes for it. Nothing is started.
//!
//! Needs `systemd-analyze` (package systemd, see scripts/setup-host.sh), not
//! root: `cargo test --test systemd_unit -- --ignored`.

mod common;

use std::process::Command;

const UNIT: &str = "vfrelay.service";
const INSTALLED_BIN: &str = "/usr/local/bin/vfrelay";

fn unit_text() -> String {
    let path = common::repo_root().join("contrib/systemd").join(UNIT);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `key=` (the only such line), comments skipped.
fn value<'a>(unit: &'a str, key: &str) -> &'a str {
    let mut found = unit
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='));
    let v = found
        .next()
        .unwrap_or_else(|| panic!("no {key}= in {UNIT}"));
    assert!(found.next().is_none(), "{key}= twice in {UNIT}");
    v.trim()
}

/// The unit as installed would read, but running the binary cargo built:
/// verify checks that ExecStart's program exists and is executable.
fn with_built_binary(unit: &str) -> String {
    let exec = value(unit, "ExecStart");
    let args = exec
        .strip_prefix(INSTALLED_BIN)
        .unwrap_or_else(|| panic!("ExecStart does not run {INSTALLED_BIN}: {exec}"));
    // Quoted: a target directory may contain spaces.
    let built = format!("\"{}\"{args}", env!("CARGO_BIN_EXE_vfrelay"));
    unit.replacen(
        &format!("ExecStart={exec}"),
        &format!("ExecStart={built}"),
        1,
    )
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install systemd (scripts/setup-host.sh)")
        })
}

#[test]
#[ignore = "needs systemd-analyze (scripts/setup-host.sh installs systemd)"]
fn the_unit_verifies_clean() {
    let unit = unit_text();
    let dir = common::TempDir::new();
    let path = dir.join(UNIT);
    std::fs::write(&path, with_built_binary(&unit)).unwrap();

    // --recursive-errors=no: a non-zero exit for warnings about this unit
    // only, not about the host's units it is ordered against. --man=no:
    // nothing to look up, and man may be missing.
    let out = systemd_analyze(&[
        "verify",
        "--recursive-errors=no",
        "--man=no",
        path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about this unit name it by path or by unit name; any other
    // line is about the host.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(UNIT)).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} ({}):\n{stderr}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    // verify ignores capability names it does not know, silently: a typo
    // would drop a capability the daemon needs.
    let caps: Vec<&str> = value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .collect();
    let mut args = vec!["capability"];
    args.extend(&caps);
    let out = systemd_analyze(&args);
    assert!(
        out.status.success(),
        "CapabilityBoundingSet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_IPC_LOCK",
        // --socket-owner hands sockets to libvirt-qemu.
        "CAP_CHOWN",
    ] {
        assert!(caps.contains(&c), "CapabilityBoundingSet lacks {c}");
    }
}

/// What the README says about the service, which verify cannot know: the
/// control socket is where clients look by default, and both it and the
/// state file are in directories systemd creates for the unit.
#[test]
fn the_unit_puts_its_files_where_systemd_and_the_clients_expect() {
    let unit = unit_text();
    let exec = value(&unit, "ExecStart");
    let flag = |name: &str| {
        let mut w = exec.split_whitespace();
        w.find(|&a| a == name)
            .and_then(|_| w.next())
            .unwrap_or_else(|| panic!("ExecStart has no {name} PATH: {exec}"))
    };
    assert!(
        exec.starts_with(&format!("{INSTALLED_BIN} daemon ")),
        "{exec}"
    );
    let control = flag("--control");
    assert_eq!(control, "/run/vfrelay/control.sock");
    assert_eq!(
        control,
        format!("/run/{}/control.sock", value(&unit, "RuntimeDirectory"))
    );
    assert_eq!(
        flag("--state"),
        format!("/var/lib/{}/ports.json", value(&unit, "StateDirectory"))
    );
}
