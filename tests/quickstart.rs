//! The README's quick-start command starts a daemon a user can talk to.
use std::process::{Command, Stdio};

use crate::common::*;

#[test]
fn readme_example_answers_qmp() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    assert!(
        readme.contains("examples/run.sh"),
        "README names the example script"
    );
    let dir = TempDir::new();
    let mut child = Command::new("timeout")
        .args([
            "60",
            "bash",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/run.sh"),
        ])
        .env("RSD_BIN", rsd_bin())
        .env("RSD_DIR", &dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run example");
    let mut q = Qmp::ready(&dir.path("qmp.sock"));
    assert!(wait_for_path(&dir.path("rsd.pid"), 30), "start-up finished");
    let info = std::process::Command::new("qemu-img")
        .args([
            "info",
            &format!("nbd+unix:///disk?socket={}", dir.s("nbd.sock")),
        ])
        .output()
        .expect("qemu-img");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("virtual size: 64 MiB"),
        "{info:?}"
    );
    let v = q.cmd(r#"{"execute":"query-version"}"#);
    assert!(v["return"]["package"]
        .as_str()
        .unwrap_or_default()
        .starts_with("rsd "));
    let objs = q.cmd(r#"{"execute":"qom-list","arguments":{"path":"/objects"}}"#);
    assert!(objs.to_string().contains("child<secret>"), "{objs}");
    q.send(br#"{"execute":"quit"}"#);
    let _ = q.line();
    let st = child.wait().expect("wait");
    assert!(st.success(), "example exits 0 after quit");
}
