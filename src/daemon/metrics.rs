//! `--metrics ADDR`: the counters of every queue pair in Prometheus text
//! exposition format at `http://ADDR/metrics`.
//!
//! A thread of its own serves it (tiny_http). It reads the counters the
//! workers publish ([`SharedStats`], relaxed atomics) through a table of
//! ports that only the control thread changes: a scrape never sends a
//! worker a command and holds no lock a worker takes.

use std::fmt::Write;
use std::sync::{Arc, RwLock};

use log::{info, warn};

use crate::stats::{SharedStats, COUNTERS};

/// Port name -> (queue pair index, counters), as the control thread keeps it.
pub type Table = Arc<RwLock<Vec<(String, Vec<(usize, Arc<SharedStats>)>)>>>;

/// Start serving `addr` ("127.0.0.1:9464"); the thread lives as long as the
/// process.
pub fn serve(addr: &str, table: Table) -> Result<(), String> {
    let server = tiny_http::Server::http(addr).map_err(|e| format!("metrics on {addr}: {e}"))?;
    info!("metrics at http://{addr}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (code, body) = match (req.method(), req.url()) {
                    (tiny_http::Method::Get, "/metrics") => (200, render(&table)),
                    (tiny_http::Method::Get, _) => (404, "not found: try /metrics\n".into()),
                    _ => (405, "GET only\n".into()),
                };
                let ctype = tiny_http::Header::from_bytes(
                    "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .expect("a valid header");
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(ctype);
                if let Err(e) = req.respond(resp) {
                    warn!("metrics: answering a scrape: {e}");
                }
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))?;
    Ok(())
}

/// A label value as the exposition format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every counter family, with `port` and `queue` labels.
pub fn render(table: &Table) -> String {
    let ports = table.read().unwrap_or_else(|e| e.into_inner());
    let snaps: Vec<(String, usize, [u64; crate::stats::N_COUNTERS])> = ports
        .iter()
        .flat_map(|(name, qps)| {
            qps.iter()
                .map(move |(i, s)| (escape(name), *i, s.snapshot().values()))
        })
        .collect();
    drop(ports);
    let mut out = String::new();
    let mut family = "";
    for (k, c) in COUNTERS.iter().enumerate() {
        if c.metric.is_empty() {
            continue;
        }
        if c.metric != family {
            family = c.metric;
            let _ = writeln!(out, "# HELP vfrelay_{family}_total {}", c.help);
            let _ = writeln!(out, "# TYPE vfrelay_{family}_total counter");
        }
        for (port, queue, values) in &snaps {
            let extra = c
                .label
                .map(|(l, v)| format!(",{l}=\"{v}\""))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "vfrelay_{family}_total{{port=\"{port}\",queue=\"{queue}\"{extra}}} {}",
                values[k]
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::QueueStats;

    #[test]
    fn families_are_named_helped_and_labelled() {
        let s = Arc::new(SharedStats::default());
        let mut q = QueueStats::default();
        q.count_rx(60, Some(&[0xff; 6]));
        q.count_rx(200, Some(&[0x02; 6]));
        s.publish(&q);
        let table: Table = Arc::new(RwLock::new(vec![("vm0".into(), vec![(0, s)])]));
        let text = render(&table);
        assert!(
            text.contains("# TYPE vfrelay_rx_frames_total counter\n"),
            "{text}"
        );
        assert!(text.contains("vfrelay_rx_frames_total{port=\"vm0\",queue=\"0\"} 2\n"));
        assert!(text.contains("vfrelay_rx_broadcast_frames_total{port=\"vm0\",queue=\"0\"} 1\n"));
        assert!(
            text.contains("vfrelay_rx_size_frames_total{port=\"vm0\",queue=\"0\",size=\"64\"} 1\n")
        );
        assert!(text.contains(
            "vfrelay_rx_size_frames_total{port=\"vm0\",queue=\"0\",size=\"128-255\"} 1\n"
        ));
        // One HELP and TYPE per family, and sums that are JSON-only are not
        // exported next to their labelled family.
        assert_eq!(
            text.matches("# TYPE vfrelay_rx_size_frames_total").count(),
            1
        );
        assert!(!text.contains("vfrelay_rx_dropped_total"));
        assert!(!text.contains("vfrelay_chain_errors_total{port=\"vm0\",queue=\"0\"} "));
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split(' ').count() > 3, "empty help: {line}");
        }
    }
}
