//! Jobs and blockdev-create against qemu-storage-daemon: the same QMP
//! transcripts (events, their order around replies, errors), images that
//! `qemu-img` reads as the same, and the behaviour of long jobs.
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// Sends each step and collects every line until the reply and then until
/// the socket is quiet for a moment (events after the reply). Timestamps
/// are removed and the temp dir is masked.
pub fn transcript(which: Which, setup: &dyn Fn(&TempDir), steps: &[&str]) -> Vec<String> {
    let dir = TempDir::new();
    setup(&dir);
    let d = dir.0.display().to_string();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let _daemon = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10));
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let mut out = Vec::new();
    for s in steps {
        if let Some(ms) = s.strip_prefix("sleep ") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            continue;
        }
        // "until TEXT": take every line until one holds TEXT.
        if let Some(want) = s.strip_prefix("until ") {
            // Already seen after the last command?
            let last_cmd = out
                .iter()
                .rposition(|l: &String| l.starts_with(">> "))
                .unwrap_or(0);
            // Lines kept are compact JSON; `want` may be in QMP's spacing.
            let compact = want.replace(", ", ",").replace(": ", ":");
            if out[last_cmd..]
                .iter()
                .any(|l: &String| l.contains(want) || l.contains(&compact))
            {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                assert!(Instant::now() < deadline, "{which:?}: never saw {want}");
                if !q.readable_within(200) {
                    continue;
                }
                let l = q.line();
                assert!(!l.is_empty(), "{which:?}: EOF waiting for {want}");
                let mut v: serde_json::Value = serde_json::from_str(&l).expect("json");
                if let Some(o) = v.as_object_mut() {
                    o.remove("timestamp");
                }
                mask_file_sizes(&mut v);
                out.push(mask_sizes(&mask(&v.to_string(), &dir)));
                if l.contains(want) {
                    break;
                }
            }
            continue;
        }
        // "sh CMD": a shell command between requests (writes through
        // an export, a client's view); it must succeed, and its output
        // is part of the transcript.
        if let Some(cmd) = s.strip_prefix("sh ") {
            let o = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd.replace("$D", &d))
                .output()
                .expect("sh");
            assert!(o.status.success(), "{which:?}: {cmd}: {o:?}");
            out.push(format!("$ {cmd}"));
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                out.push(mask(&format!("| {l}"), &dir));
            }
            continue;
        }
        out.push(format!(">> {s}"));
        q.send(s.replace("$D", &d).as_bytes());
        let mut replied = false;
        loop {
            if replied && !q.readable_within(300) {
                break;
            }
            let l = q.line();
            if l.is_empty() {
                break;
            }
            let mut v: serde_json::Value = serde_json::from_str(&l).expect("json");
            if let Some(o) = v.as_object_mut() {
                o.remove("timestamp");
                replied |= o.contains_key("return") || o.contains_key("error");
            }
            mask_file_sizes(&mut v);
            out.push(mask_sizes(&mask(&v.to_string(), &dir)));
        }
    }
    if !steps.last().is_some_and(|s| s.contains(r#""quit""#)) {
        q.send(br#"{"execute":"quit"}"#);
    }
    out
}

/// A qcow2 file's length while it is open: rsd grows the file ahead of
/// its allocations (differences entry 21), so a file node's size is
/// masked.
fn mask_file_sizes(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.get("format").and_then(|f| f.as_str()) == Some("file") {
                if let Some(s) = o.get_mut("virtual-size") {
                    *s = serde_json::json!("N");
                }
            }
            for x in o.values_mut() {
                mask_file_sizes(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(mask_file_sizes),
        _ => {}
    }
}

/// Host allocation ("actual-size") depends on the filesystem's block
/// placement, not on the daemon: masked.
fn mask_sizes(line: &str) -> String {
    let key = "\"actual-size\":";
    let mut out = String::new();
    let mut rest = line;
    while let Some(p) = rest.find(key) {
        out.push_str(&rest[..p + key.len()]);
        rest = &rest[p + key.len()..];
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        out.push('N');
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

pub fn same_transcripts(setup: &dyn Fn(&TempDir), steps: &[&str]) -> Vec<String> {
    let all: Vec<Vec<String>> = Which::all()
        .into_iter()
        .map(|w| transcript(w, setup, steps))
        .collect();
    if all.len() == 2 {
        if all[0] != all[1] {
            eprintln!("rsd: {:#?}\nqsd: {:#?}", all[0], all[1]);
        }
        for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(a, b, "line {i} differs (rsd, then QSD)");
        }
        assert_eq!(all[0].len(), all[1].len(), "{:#?}\n{:#?}", all[0], all[1]);
    }
    all.into_iter().next().expect("a daemon")
}

fn no_setup(_: &TempDir) {}

pub fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn create_job_life_cycle_and_verbs_match_qsd() {
    let out = same_transcripts(
        &no_setup,
        &[
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"file","filename":"$D/a.img","size":1048576}}}"#,
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-pause","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-resume","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-cancel","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-complete","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-finalize","arguments":{"id":"j1"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"file","filename":"$D/b.img","size":1048576}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"9bad","options":{"driver":"file","filename":"$D/b.img","size":1048576}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"","options":{"driver":"file","filename":"$D/b.img","size":1048576}}}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#,
            r#"{"execute":"job-pause","arguments":{"id":"nope"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j2","options":{"driver":"file","filename":"/nonexistent/b.img","size":1048576}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j3","options":{"driver":"file","filename":"$D/c.img","size":1048576,"preallocation":"full","nocow":true}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j4","options":{"driver":"file","filename":"$D/d.img","size":-1}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j5","options":{"driver":"file","filename":"$D/e.img","size":1000,"preallocation":"metadata"}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j6","options":{"driver":"vdi","file":"x","size":1000}}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j7","options":{"driver":"file","filename":"$D/f.img","size":65536,"preallocation":"falloc"}}}"#,
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j2"}}"#,
            r#"{"execute":"query-jobs"}"#,
        ],
    );
    // Success: created, running, reply, waiting, pending, concluded.
    let j1: Vec<&String> = out.iter().take(7).collect();
    assert!(
        j1[1].contains("created") && j1[2].contains("running") && j1[3].contains("return"),
        "{j1:?}"
    );
    assert!(
        j1[4].contains("waiting") && j1[5].contains("pending") && j1[6].contains("concluded"),
        "{j1:?}"
    );
    assert_eq!(count(&out, "cannot accept command verb"), 4);
    assert_eq!(count(&out, r#""Job not found""#), 2);
    assert_eq!(
        count(
            &out,
            "Could not create '/nonexistent/b.img': No such file or directory"
        ),
        1
    );
    assert_eq!(count(&out, "Unsupported preallocation mode: metadata"), 2);
}

/// A file node for qcow2 to format, and some that cannot be used.
fn qcow2_targets(d: &TempDir) {
    for f in ["f1", "f2", "f3"] {
        std::fs::write(d.path(&format!("{f}.img")), b"").expect("file");
    }
}

#[test]
fn qcow2_create_errors_match_qsd() {
    let add = r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f2","filename":"$D/f2.img"}}"#;
    let ro = r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"ro","filename":"$D/f3.img","read-only":true}}"#;
    let mut steps = vec![add.to_string(), ro.to_string()];
    let cases = [
        r#""file":"nope","size":16777216"#,
        r#""file":"ro","size":1048576"#,
        r#""file":"f2","size":1000"#,
        r#""file":"f2","size":1048576,"cluster-size":1000"#,
        r#""file":"f2","size":1048576,"cluster-size":4194304"#,
        r#""file":"f2","size":1048576,"version":"v2","extended-l2":true"#,
        r#""file":"f2","size":1048576,"extended-l2":true,"cluster-size":8192"#,
        r#""file":"f2","size":1048576,"backing-file":"b.img","preallocation":"metadata""#,
        r#""file":"f2","size":1048576,"backing-fmt":"raw""#,
        r#""file":"f2","size":1048576,"version":"v2","lazy-refcounts":true"#,
        r#""file":"f2","size":1048576,"refcount-bits":3"#,
        r#""file":"f2","size":1048576,"refcount-bits":128"#,
        r#""file":"f2","size":1048576,"version":"v2","refcount-bits":8"#,
        r#""file":"f2","size":1048576,"data-file-raw":true"#,
        r#""file":"f2","size":1048576,"data-file":"f2","data-file-raw":true,"backing-file":"x""#,
        r#""file":"f2","size":1048576,"version":"v2","data-file":"f2""#,
        r#""file":"f2","size":1048576,"version":"v2","compression-type":"zstd""#,
        r#""file":"f2","size":1048576,"cluster-size":1000,"refcount-bits":3"#,
    ];
    for (i, c) in cases.iter().enumerate() {
        steps.push(format!(
            r#"{{"execute":"blockdev-create","arguments":{{"job-id":"c{i}","options":{{"driver":"qcow2",{c}}}}}}}"#
        ));
    }
    steps.push(r#"{"execute":"query-jobs"}"#.into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_transcripts(&qcow2_targets, &steps);
    let jobs = out.last().expect("query-jobs");
    assert_eq!(jobs.matches(r#""error":"#).count(), cases.len(), "{jobs}");
    assert!(jobs.contains("Block node is read-only"), "{jobs}");
    assert!(
        jobs.contains("Cluster size must be a power of two between 512 and 2048k"),
        "{jobs}"
    );
}

/// Options for the matrix: each creates f.img's image on both daemons.
const MATRIX: &[&str] = &[
    r#""size":16777216"#,
    r#""size":1073741824,"cluster-size":4096"#,
    r#""size":16777216,"cluster-size":2097152"#,
    r#""size":16777216,"version":"v2""#,
    r#""size":16777216,"refcount-bits":1,"lazy-refcounts":true"#,
    r#""size":16777216,"refcount-bits":64"#,
    r#""size":16777216,"extended-l2":true,"cluster-size":32768"#,
    r#""size":16777216,"compression-type":"zstd""#,
    r#""size":16777216,"backing-file":"base.qcow2","backing-fmt":"qcow2""#,
    r#""size":16777216,"backing-file":"base.raw""#,
    r#""size":16777216,"data-file":"df""#,
    r#""size":16777216,"data-file":"df","data-file-raw":true"#,
    r#""size":16777216,"preallocation":"metadata""#,
    r#""size":16777216,"preallocation":"falloc""#,
    r#""size":16777216,"preallocation":"full""#,
];

/// Creates the image of each matrix entry with `which`; returns the dir.
fn create_matrix(which: Which) -> TempDir {
    let dir = TempDir::new();
    // The backing files the images name (check opens them).
    for (f, fmt) in [("base.qcow2", "qcow2"), ("base.raw", "raw")] {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt, &dir.s(f), "16M"])
            .status()
            .expect("qemu-img");
        assert!(st.success());
    }
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let mut d = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10));
    let mut q = Qmp::ready(&dir.path("q.sock"));
    for (i, opts) in MATRIX.iter().enumerate() {
        std::fs::write(dir.path(&format!("{i}.qcow2")), b"").expect("file");
        std::fs::write(dir.path(&format!("{i}.data")), b"").expect("file");
        for (node, file) in [
            (format!("f{i}"), format!("{i}.qcow2")),
            (format!("df{i}"), format!("{i}.data")),
        ] {
            let r = q.cmd(&format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"file","node-name":"{node}","filename":"{}"}}}}"#,
                dir.s(&file)
            ));
            assert!(r.get("return").is_some(), "{which:?}: {r}");
        }
        let opts = opts.replace(r#""data-file":"df""#, &format!(r#""data-file":"df{i}""#));
        let r = q.cmd(&format!(
            r#"{{"execute":"blockdev-create","arguments":{{"job-id":"m{i}","options":{{"driver":"qcow2","file":"f{i}",{opts}}}}}}}"#
        ));
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = q.cmd(r#"{"execute":"query-jobs"}"#);
            let job = &jobs["return"][0];
            if job["status"] == "concluded" {
                assert!(job.get("error").is_none(), "{which:?} {opts}: {job}");
                break;
            }
            assert!(Instant::now() < until, "{which:?}: job {i} never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = q.cmd(&format!(
            r#"{{"execute":"job-dismiss","arguments":{{"id":"m{i}"}}}}"#
        ));
        assert!(r.get("return").is_some(), "{r}");
    }
    q.send(br#"{"execute":"quit"}"#);
    let _ = q.line();
    assert_eq!(d.wait_exit(10), Some(0));
    dir
}

/// The image's bytes with its directory's name (in a data file name)
/// cut out.
fn masked_bytes(dir: &TempDir, i: usize) -> Vec<u8> {
    let b = std::fs::read(dir.path(&format!("{i}.qcow2"))).expect("image");
    let d = dir.0.display().to_string().into_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut at = 0;
    while at < b.len() {
        if b[at..].starts_with(&d) {
            at += d.len();
        } else {
            out.push(b[at]);
            at += 1;
        }
    }
    out
}

fn info(dir: &TempDir, i: usize) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", &dir.s(&format!("{i}.qcow2"))])
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).replace(&dir.0.display().to_string(), "$D");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    if let Some(o) = v.as_object_mut() {
        o.remove("filename");
    }
    if let Some(df) = v.pointer_mut("/format-specific/data/data-file") {
        *df = serde_json::json!("DF");
    }
    v
}

#[test]
fn created_images_match_qsd_field_for_field() {
    let ours = create_matrix(Which::Rsd);
    for (i, opts) in MATRIX.iter().enumerate() {
        let check = Command::new("qemu-img")
            .args(["check", &ours.s(&format!("{i}.qcow2"))])
            .output()
            .expect("qemu-img");
        assert!(
            check.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    if !std::path::Path::new(QSD).exists() {
        eprintln!("note: {QSD} missing; not comparing images");
        return;
    }
    let theirs = create_matrix(Which::Qsd);
    for (i, opts) in MATRIX.iter().enumerate() {
        let (mut a, mut b) = (info(&ours, i), info(&theirs, i));
        // What the file system has allocated so far depends on its
        // timing (and, preallocated, where clusters go is rsd's own
        // documented choice); what the image says must be the same.
        for v in [&mut a, &mut b] {
            v.as_object_mut().map(|o| o.remove("actual-size"));
            if let Some(c) = v.pointer_mut("/children/0/info") {
                c.as_object_mut().map(|o| o.remove("actual-size"));
            }
        }
        if !opts.contains("preallocation") {
            let same = masked_bytes(&ours, i) == masked_bytes(&theirs, i);
            assert!(same, "{opts}: the image bytes differ from QSD's");
        }
        assert_eq!(a, b, "{opts}");
    }
}

/// A created image works: added, exported, written and read back.
#[test]
fn created_image_can_be_added_exported_and_written() {
    let dir = TempDir::new();
    std::fs::write(dir.path("new.qcow2"), b"").expect("file");
    let sock = dir.s("nbd.sock");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=f,filename={}", dir.s("new.qcow2")),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={sock}"),
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    q.cmd(r#"{"execute":"blockdev-create","arguments":{"job-id":"c","options":{"driver":"qcow2","file":"f","size":33554432,"cluster-size":16384}}}"#);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0]["status"],
        "concluded"
    );
    for c in [
        r#"{"execute":"job-dismiss","arguments":{"id":"c"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":"f"}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true}}"#,
    ] {
        let r = q.cmd(c);
        assert!(r.get("return").is_some(), "{c}: {r}");
    }
    let url = format!("nbd+unix:///q?socket={sock}");
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 1M 3M",
            "-c",
            "read -P 0x5c 1M 3M",
            "-c",
            "read -P 0 0 1M",
            &url,
        ])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&io.stdout);
    assert!(io.status.success() && !text.contains("fail"), "{text}");
    q.send(br#"{"execute":"quit"}"#);
    let _ = q.line();
    std::thread::sleep(Duration::from_millis(300));
    let check = Command::new("qemu-img")
        .args(["check", &dir.s("new.qcow2")])
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5c 1M 3M",
            &dir.s("new.qcow2"),
        ])
        .output()
        .expect("qemu-io");
    assert!(!String::from_utf8_lossy(&cmp.stdout).contains("fail"));
}

/// Reads events and replies until `want` matches one (or times out).
fn wait_line(q: &mut Qmp, want: &str, secs: u64) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    while Instant::now() < until {
        if !q.readable_within(200) {
            continue;
        }
        let l = q.line();
        if l.is_empty() {
            break;
        }
        let done = l.contains(want);
        seen.push(l);
        if done {
            return seen;
        }
    }
    panic!("never saw {want}: {seen:?}");
}

/// A long create (full preallocation): verbs in state running answer as
/// in QSD; progress moves while it runs (bytes: a deliberate difference);
/// cancel ends it promptly with "Operation canceled".
#[test]
fn long_create_job_running_verbs_progress_and_cancel() {
    let dir = TempDir::new();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let img = format!("/dev/shm/rsd-job-{}.img", std::process::id());
    q.send(format!(r#"{{"execute":"blockdev-create","arguments":{{"job-id":"s","options":{{"driver":"file","filename":"{img}","size":4294967296,"preallocation":"full"}}}}}}"#).as_bytes());
    wait_line(&mut q, "return", 10);
    let verbs = [
        ("job-pause", r#"{"return": {}}"#),
        ("job-pause", "Job is already paused"),
        ("job-resume", r#"{"return": {}}"#),
        ("job-resume", "Can't resume a job that was not paused"),
        (
            "job-complete",
            "Job 's' in state 'running' cannot accept command verb 'complete'",
        ),
        (
            "job-finalize",
            "Job 's' in state 'running' cannot accept command verb 'finalize'",
        ),
        (
            "job-dismiss",
            "Job 's' in state 'running' cannot accept command verb 'dismiss'",
        ),
    ];
    for (verb, want) in verbs {
        q.send(format!(r#"{{"execute":"{verb}","arguments":{{"id":"s"}}}}"#).as_bytes());
        let l = q.line();
        assert!(l.contains(want), "{verb}: {l}");
    }
    let p1 = q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0]["current-progress"]
        .as_u64()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(200));
    let j = q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0].clone();
    assert_eq!(j["status"], "running", "{j}");
    assert_eq!(j["total-progress"], 4294967296u64, "{j}");
    assert!(
        j["current-progress"].as_u64().unwrap_or(0) > p1,
        "no progress: {p1} then {j}"
    );
    let t = Instant::now();
    q.send(br#"{"execute":"job-cancel","arguments":{"id":"s"}}"#);
    let seen = wait_line(&mut q, r#""concluded""#, 10);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        t.elapsed()
    );
    assert!(seen.iter().any(|l| l.contains(r#""aborting""#)), "{seen:?}");
    let j = q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0].clone();
    assert_eq!(j["error"], "Operation canceled", "{j}");
    let _ = std::fs::remove_file(&img);
    // quit with a job running: it is cancelled and rsd exits at once.
    q.send(format!(r#"{{"execute":"blockdev-create","arguments":{{"job-id":"t","options":{{"driver":"file","filename":"{img}","size":8589934592,"preallocation":"full"}}}}}}"#).as_bytes());
    wait_line(&mut q, "return", 10);
    let t = Instant::now();
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "quit took {:?}",
        t.elapsed()
    );
    let _ = std::fs::remove_file(&img);
}

/// A job whose work panics is a failed job; the daemon keeps serving.
#[test]
fn a_panicking_job_fails_and_the_daemon_serves_on() {
    let dir = TempDir::new();
    let a = monitor_args(&dir.s("q.sock"));
    let _d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let img = format!("/dev/shm/rsd-panic-{}.img", std::process::id());
    q.send(format!(r#"{{"execute":"blockdev-create","arguments":{{"job-id":"p","options":{{"driver":"file","filename":"{img}","size":4294967296,"preallocation":"full"}}}}}}"#).as_bytes());
    wait_line(&mut q, "return", 10);
    let r = q.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"job/p"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_line(&mut q, r#""concluded""#, 10);
    let j = q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0].clone();
    assert!(
        j["error"]
            .as_str()
            .unwrap_or_default()
            .contains("job crash requested"),
        "{j}"
    );
    let r = q.cmd(r#"{"execute":"job-dismiss","arguments":{"id":"p"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(
        q.cmd(r#"{"execute":"query-jobs"}"#)["return"],
        serde_json::json!([])
    );
    let _ = std::fs::remove_file(&img);
}

/// Cancel of a running create job: the same events and the same end as
/// in QSD (QSD gets there only after writing the whole image).
#[test]
fn cancelled_create_job_ends_as_in_qsd() {
    let mut ends = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        let a = monitor_args(&dir.s("q.sock"));
        let _d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let img = format!("/dev/shm/rsd-cancel-{}-{which:?}.img", std::process::id());
        q.send(format!(r#"{{"execute":"blockdev-create","arguments":{{"job-id":"x","options":{{"driver":"file","filename":"{img}","size":1073741824,"preallocation":"full"}}}}}}"#).as_bytes());
        let mut lines = wait_line(&mut q, "return", 10);
        q.send(br#"{"execute":"job-cancel","arguments":{"id":"x"}}"#);
        lines.extend(wait_line(&mut q, r#""concluded""#, 60));
        let statuses: Vec<String> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["data"]["status"].as_str().map(String::from))
            .collect();
        let job = q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0].clone();
        let _ = std::fs::remove_file(&img);
        ends.push((statuses, job));
    }
    let (statuses, job) = &ends[0];
    assert_eq!(statuses, &["created", "running", "aborting", "concluded"]);
    assert_eq!(job["error"], "Operation canceled");
    assert_eq!(job["current-progress"], 1);
    if ends.len() == 2 {
        assert_eq!(ends[0], ends[1]);
    }
}
