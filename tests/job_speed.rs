//! Block-job speed limits hold over a long copy: the rate a job's
//! progress moves at, once its first burst is out, is within 10% of
//! `speed`.
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;
const LEN: u64 = 40 * MIB;
const SPEED: u64 = 16 * MIB;

/// Samples (time, offset) of the only block job until it is ready or
/// gone, and returns the rate between the first sample past half of
/// the copy (past the first burst, a buffer of 16 MiB for mirror) and
/// the last one that moved.
fn measured_rate(q: &mut Qmp) -> f64 {
    let until = Instant::now() + Duration::from_secs(60);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    loop {
        let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
        let Some(job) = r["return"].as_array().and_then(|a| a.first()).cloned() else {
            break;
        };
        let off = job["offset"].as_u64().unwrap_or(0);
        if samples.last().is_none_or(|(_, o)| *o != off) {
            samples.push((Instant::now(), off));
        }
        if job["ready"] == true || off >= LEN {
            break;
        }
        assert!(Instant::now() < until, "the job never finished: {r}");
        std::thread::yield_now();
    }
    let first = samples
        .iter()
        .find(|(_, o)| *o >= LEN / 2)
        .copied()
        .expect("no sample past half");
    let last = *samples.last().expect("no samples");
    assert!(last.1 >= LEN * 9 / 10, "the job stopped early: {samples:?}");
    (last.1 - first.1) as f64 / last.0.duration_since(first.0).as_secs_f64()
}

fn image_with_data(path: &str, backing: Option<&str>) {
    let mut argv = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        argv.extend(["-b", b, "-F", "qcow2"]);
    }
    argv.extend([path, "40M"]);
    ok(&run("qemu-img", &argv));
    if backing.is_none() {
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x3c 0 40M", path],
        ));
    }
}

#[test]
fn job_speed_holds_within_ten_percent() {
    for job in ["mirror", "backup", "stream"] {
        let dir = TempDir::new();
        let (src, tgt) = (dir.s("src.qcow2"), dir.s("tgt.qcow2"));
        image_with_data(&src, None);
        let mut a = monitor_args(&dir.s("q.sock"));
        let cmd = match job {
            "stream" => {
                image_with_data(&tgt, Some(&src));
                a.extend(args(&[
                    "--blockdev",
                    &format!("driver=qcow2,node-name=top,file.driver=file,file.filename={tgt}"),
                ]));
                format!(
                    r#"{{"execute":"block-stream","arguments":{{"job-id":"j","device":"top","speed":{SPEED}}}}}"#
                )
            }
            _ => {
                ok(&run(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", &tgt, "40M"],
                ));
                a.extend(args(&[
                    "--blockdev",
                    &format!("driver=qcow2,node-name=src,file.driver=file,file.filename={src}"),
                    "--blockdev",
                    &format!("driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"),
                ]));
                format!(
                    r#"{{"execute":"blockdev-{job}","arguments":{{"job-id":"j","device":"src","target":"tgt","sync":"full","speed":{SPEED}}}}}"#
                )
            }
        };
        let mut d = Daemon::spawn(Which::Rsd, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(&cmd);
        assert!(r.get("return").is_some(), "{job}: {r}");
        let rate = measured_rate(&mut q);
        let off = (rate - SPEED as f64).abs() / SPEED as f64;
        eprintln!("{job}: {:.2} MiB/s", rate / MIB as f64);
        assert!(
            off < 0.10,
            "{job}: {:.2} MiB/s against a limit of {} MiB/s",
            rate / MIB as f64,
            SPEED / MIB
        );
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0), "{job}");
    }
}
