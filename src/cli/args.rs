//! Scanning argv the way QSD's getopt_long does: long options with unique
//! abbreviations, `--opt=value` and `--opt value`, `-T value` and
//! `-Tvalue`, positional arguments reported in place. The messages are
//! getopt's.

/// One command-line item, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Help,
    Version,
    Trace(String),
    Blockdev(String),
    Chardev(String),
    Monitor(String),
    Object(String),
    Pidfile(String),
    Daemonize,
    NbdServer(String),
    Export(String),
    /// rsd's `--metrics-server` (beyond QSD).
    MetricsServer(String),
    /// A positional argument (an error when processed).
    Positional(String),
}

impl Arg {
    /// How QEMU names the option in error locations: `--blockdev VALUE`.
    pub fn location(&self) -> String {
        match self {
            Arg::Trace(v) => format!("-T {v}"),
            Arg::Blockdev(v) => format!("--blockdev {v}"),
            Arg::Chardev(v) => format!("--chardev {v}"),
            Arg::Monitor(v) => format!("--monitor {v}"),
            Arg::Object(v) => format!("--object {v}"),
            Arg::Pidfile(v) => format!("--pidfile {v}"),
            Arg::NbdServer(v) => format!("--nbd-server {v}"),
            Arg::Export(v) => format!("--export {v}"),
            Arg::MetricsServer(v) => format!("--metrics-server {v}"),
            Arg::Positional(v) => v.clone(),
            Arg::Help => "--help".into(),
            Arg::Version => "--version".into(),
            Arg::Daemonize => "--daemonize".into(),
        }
    }
}

const LONG: &[(&str, bool)] = &[
    ("blockdev", true),
    ("chardev", true),
    ("daemonize", false),
    ("export", true),
    ("help", false),
    ("monitor", true),
    ("nbd-server", true),
    ("object", true),
    ("pidfile", true),
    ("trace", true),
    ("version", false),
];

/// rsd's own options. An abbreviation matches them only when it matches
/// none of QSD's, so QSD's abbreviations (`--m` for `--monitor`) keep
/// their meaning.
const EXTENSIONS: &[(&str, bool)] = &[("metrics-server", true)];

fn make(name: &str, value: Option<String>) -> Arg {
    let v = value.unwrap_or_default();
    match name {
        "blockdev" => Arg::Blockdev(v),
        "chardev" => Arg::Chardev(v),
        "daemonize" => Arg::Daemonize,
        "export" => Arg::Export(v),
        "metrics-server" => Arg::MetricsServer(v),
        "help" => Arg::Help,
        "monitor" => Arg::Monitor(v),
        "nbd-server" => Arg::NbdServer(v),
        "object" => Arg::Object(v),
        "pidfile" => Arg::Pidfile(v),
        "trace" => Arg::Trace(v),
        _ => Arg::Version,
    }
}

/// Scans the arguments after the program name. An error is getopt's
/// message (without the program prefix).
pub fn scan(argv: &[String]) -> Result<Vec<Arg>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a == "--" {
            out.extend(argv[i..].iter().cloned().map(Arg::Positional));
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = LONG.iter().chain(EXTENSIONS).find(|(n, _)| *n == name);
            let mut matches: Vec<_> = LONG.iter().filter(|(n, _)| n.starts_with(name)).collect();
            if matches.is_empty() {
                matches = EXTENSIONS
                    .iter()
                    .filter(|(n, _)| n.starts_with(name))
                    .collect();
            }
            let (full, takes) = match (exact, matches.as_slice()) {
                (Some(e), _) => *e,
                (None, [one]) => **one,
                (None, []) => return Err(format!("unrecognized option '{a}'")),
                (None, many) => {
                    let names: Vec<String> = many.iter().map(|(n, _)| format!("'--{n}'")).collect();
                    return Err(format!(
                        "option '--{name}' is ambiguous; possibilities: {}",
                        names.join(" ")
                    ));
                }
            };
            let value = if takes {
                match inline {
                    Some(v) => Some(v),
                    None if i < argv.len() => {
                        i += 1;
                        Some(argv[i - 1].clone())
                    }
                    None => return Err(format!("option '--{full}' requires an argument")),
                }
            } else if inline.is_some() {
                return Err(format!("option '--{full}' doesn't allow an argument"));
            } else {
                None
            };
            out.push(make(full, value));
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let mut chars = a[1..].char_indices();
            for (pos, c) in chars.by_ref() {
                match c {
                    'h' => out.push(Arg::Help),
                    'V' => out.push(Arg::Version),
                    'T' => {
                        let rest = &a[1 + pos + 1..];
                        let v = if !rest.is_empty() {
                            rest.to_string()
                        } else if i < argv.len() {
                            i += 1;
                            argv[i - 1].clone()
                        } else {
                            return Err("option requires an argument -- 'T'".into());
                        };
                        out.push(Arg::Trace(v));
                        break;
                    }
                    other => return Err(format!("invalid option -- '{other}'")),
                }
            }
            continue;
        }
        out.push(Arg::Positional(a.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(args: &[&str]) -> Result<Vec<Arg>, String> {
        scan(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn getopt_behaviour() {
        assert_eq!(s(&["--bogus"]), Err("unrecognized option '--bogus'".into()));
        assert_eq!(s(&["-x"]), Err("invalid option -- 'x'".into()));
        assert_eq!(
            s(&["--blockdev"]),
            Err("option '--blockdev' requires an argument".into())
        );
        assert_eq!(s(&["-T"]), Err("option requires an argument -- 'T'".into()));
        assert_eq!(
            s(&["--pid", "f", "--mon"]),
            Err("option '--monitor' requires an argument".into())
        );
        assert_eq!(
            s(&["--p"]),
            Err("option '--pidfile' requires an argument".into())
        );
        assert_eq!(
            s(&[
                "--daemon",
                "--blockdev=driver=null-co",
                "-Tfoo",
                "-T",
                "bar",
                "extra"
            ]),
            Ok(vec![
                Arg::Daemonize,
                Arg::Blockdev("driver=null-co".into()),
                Arg::Trace("foo".into()),
                Arg::Trace("bar".into()),
                Arg::Positional("extra".into())
            ])
        );
        assert_eq!(s(&["-hV"]), Ok(vec![Arg::Help, Arg::Version]));
        assert_eq!(s(&["--ver"]), Ok(vec![Arg::Version]));
        // QSD's abbreviations keep their meaning beside rsd's options.
        assert_eq!(s(&["--m", "x"]), Ok(vec![Arg::Monitor("x".into())]));
        assert_eq!(s(&["--me=y"]), Ok(vec![Arg::MetricsServer("y".into())]));
        assert_eq!(
            s(&["--metrics-server", "z"]),
            Ok(vec![Arg::MetricsServer("z".into())])
        );
        assert_eq!(
            s(&["--daemonize=x"]),
            Err("option '--daemonize' doesn't allow an argument".into())
        );
    }
}
