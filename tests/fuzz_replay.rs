//! The fuzz targets on stable, as CI runs them: every input of
//! `fuzz/corpus/TARGET/` (the seeds and the regressions found by
//! libFuzzer runs), then a few thousand inputs mutated from them with a
//! fixed seed, through the same bodies the libFuzzer targets call
//! (`rsd::fuzzing`). A panic, or an input that outlives its deadline,
//! fails the test and prints the input as hex to reproduce it.
//! RSD_FUZZ_ITERATIONS scales the mutated inputs (0: corpus only);
//! RSD_FUZZ_SEED changes the seed.
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

/// Mutated inputs per target by default (debug builds run them in a
/// few seconds each).
const ITERATIONS: &[(&str, usize)] = &[
    ("qmp", 2000),
    ("keyval", 4000),
    ("nbd", 2000),
    ("qcow2", 300),
    ("vhost_user", 1000),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            std::fs::read(e.path()).ok().map(|b| (name, b))
        })
        .collect();
    out.sort();
    out
}

/// libFuzzer's kinds of mutation, simply: bit flips, interesting
/// values, inserted, deleted and repeated bytes, and splices.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u64] = &[
        0,
        1,
        0x7f,
        0x80,
        0xff,
        0x7fff,
        0xffff,
        0x7fff_ffff,
        0xffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX,
    ];
    let mut b = base.to_vec();
    for _ in 0..=rng.below(8) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(2) == 0 {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let src = if rng.below(2) == 0 {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                for (k, &x) in src.iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = x;
                    }
                }
            }
            2 => b.insert(at, rng.next() as u8),
            3 if at < b.len() => {
                let n = rng.below(16.min(b.len() - at)) + 1;
                b.drain(at..at + n);
            }
            4 if at < b.len() => {
                let n = rng.below(64.min(b.len() - at)) + 1;
                let piece = b[at..at + n].to_vec();
                let times = rng.below(4) + 1;
                for _ in 0..times {
                    b.splice(at..at, piece.iter().copied());
                }
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = rng.below(other.len() - from) + 1;
                b.splice(at..at, other[from..from + n].iter().copied());
            }
            _ if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = rng.next() as u8;
            }
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The input for a report: as hex when short, and saved whole to a
/// file (to copy into fuzz/corpus/TARGET as a regression input).
fn shown(target: &str, input: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("rsd-fuzz-{target}-failure"));
    let saved = match std::fs::write(&path, input) {
        Ok(()) => format!("saved as {}", path.display()),
        Err(e) => format!("not saved: {e}"),
    };
    if input.len() <= 4096 {
        format!("{saved}; as hex: {}", hex(input))
    } else {
        format!("{} bytes, {saved}", input.len())
    }
}

/// How long one input may take. The bodies time out their own async
/// work; this catches a loop that never yields.
const HANG: Duration = Duration::from_secs(60);

/// Runs one input; on a panic or a hang, says which and shows it.
fn one(target: &str, what: &str, input: &[u8], body: fn(&[u8])) {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let (name, what2, copy) = (target.to_string(), what.to_string(), input.to_vec());
    let watchdog = std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(HANG) {
            eprintln!(
                "fuzz target {name} hung on {what2}; input {}",
                shown(&name, &copy)
            );
            std::process::abort();
        }
    });
    let r = std::panic::catch_unwind(|| body(input));
    let _ = done.send(());
    let _ = watchdog.join();
    if r.is_err() {
        panic!(
            "fuzz target {target} failed on {what}; input {}",
            shown(target, input)
        );
    }
}

fn replay(target: &str, body: fn(&[u8])) {
    let inputs = corpus(target);
    assert!(!inputs.is_empty(), "no corpus for {target}");
    for (name, b) in &inputs {
        one(target, &format!("corpus file {name}"), b, body);
    }
    let default = ITERATIONS
        .iter()
        .find(|(t, _)| *t == target)
        .map_or(1000, |(_, n)| *n);
    let n = std::env::var("RSD_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let seed = std::env::var("RSD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed ^ target.bytes().fold(1, |h, b| h * 31 + u64::from(b)) | 1);
    for i in 0..n {
        let base = &inputs[rng.below(inputs.len())].1;
        let other = &inputs[rng.below(inputs.len())].1;
        let input = mutate(&mut rng, base, other);
        one(target, &format!("mutated input {i}"), &input, body);
    }
    eprintln!("{target}: {} corpus inputs, {n} mutated", inputs.len());
}

#[test]
fn qmp() {
    replay("qmp", rsd::fuzzing::qmp);
}

#[test]
fn keyval() {
    replay("keyval", rsd::fuzzing::keyval);
}

#[test]
fn nbd() {
    replay("nbd", rsd::fuzzing::nbd);
}

#[test]
fn qcow2() {
    replay("qcow2", rsd::fuzzing::qcow2);
}

#[test]
fn vhost_user() {
    replay("vhost_user", rsd::fuzzing::vhost_user);
}
