//! The soak's short version (docs/reliability.md): bench/soak.py for
//! 20 s with 16 NBD clients doing verified I/O, reconnecting now and
//! then, while the monitor adds, exports, uses and removes nodes, and
//! (when the vhost-bench example is built, as scripts/test.sh does)
//! four vhost-user-blk queues write and read back blocks. No error, and
//! rsd's descriptors back where they were once every client has gone.
use std::process::Command;

use crate::common::*;

#[test]
fn short_soak_has_no_errors_and_gives_back_every_descriptor() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/soak.py");
    let bench = std::path::Path::new(rsd_bin()).with_file_name("examples/vhost-bench");
    let queues = if bench.exists() {
        "4"
    } else {
        eprintln!(
            "note: {} not built; no vhost-user-blk queues",
            bench.display()
        );
        "0"
    };
    let out = Command::new("python3")
        .args([
            script,
            "--rsd",
            rsd_bin(),
            "--duration",
            "20",
            "--clients",
            "16",
            "--warmup",
            "5",
            "--sample",
            "2",
            "--reconnect-every",
            "200",
            "--vhost-queues",
            queues,
            "--json",
        ])
        .output()
        .expect("run python3 bench/soak.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or("");
    let r: serde_json::Value = serde_json::from_str(last).expect("the soak's JSON report");
    assert_eq!(r["errors"], 0, "errors: {}", r["messages"]);
    assert_eq!(r["fds_idle_start"], r["fds_idle_end"]);
    assert_eq!(r["exit_code"], 0);
    assert!(r["ops"].as_u64().unwrap_or(0) > 1000, "{r}");
    assert!(r["reconnects"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["churn_cycles"].as_u64().unwrap_or(0) > 0, "{r}");
    if queues != "0" {
        assert!(r["vhost_ios"].as_u64().unwrap_or(0) > 1000, "{r}");
    }
    assert!(out.status.success());
}
