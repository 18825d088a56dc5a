//! The `rsd` binary: scan the command line, handle what must happen before
//! any thread exists (help, version, trace set-up, --daemonize), then run
//! the daemon on a tokio runtime.
use rsd::cli::args::{scan, Arg};
use rsd::cli::options;
use rsd::daemon::{self, Options};

fn help() -> String {
    "Usage: rsd [options]
rsd: a storage daemon that is a drop-in for qemu-storage-daemon

  -h, --help             print this help and exit
  -V, --version          print the version and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         enable trace output for matching trace points
                         (-T help lists them)

  --blockdev [driver=]<driver>[,node-name=<N>][,<option>=<value>...]
                         add a block node (the blockdev-add schema)
  --chardev <backend>,id=<id>[,<option>=<value>...]
                         add a character device (socket, stdio, null,
                         file, ringbuf)
  --daemonize            run in the background; the parent exits once
                         start-up has finished
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
                         export a block node (the block-export-add schema)
  --metrics-server addr.type=inet,addr.host=<host>,addr.port=<port>
  --metrics-server addr.type=unix,addr.path=<path>
                         serve Prometheus metrics (/metrics) and health
                         checks (/healthz, /readyz) over HTTP (rsd only)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on a character device
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
  --nbd-server addr.type=unix,addr.path=<path>
                         start the NBD server
  --object help          list the object types
  --object <type>,help   list a type's properties
  --object <type>,id=<id>[,<property>=<value>...]
                         add an object (secret, iothread, ...)
  --pidfile <path>       write the process id to <path> once started

Options are applied from left to right. rsd speaks QMP as
qemu-storage-daemon 10.0 does; see README.md.

Environment (rsd only; see README.md):
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, ...
                         send OpenTelemetry traces (OTLP, http/protobuf)
  RSD_SLOW_REQUEST_MS    node requests slower than this become spans
                         (default 100)
  RSD_LOG                a tracing filter for the log (e.g. info)
  RSD_LOG_FORMAT         text (default) or json (one object per line)
"
    .to_string()
}

fn main() {
    let mut argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // getopt names the program as invoked.
    let argv0 = if argv.is_empty() {
        "rsd".to_string()
    } else {
        argv.remove(0)
    };
    let args = match scan(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{argv0}: {e}");
            std::process::exit(1);
        }
    };
    let mut traces = Vec::new();
    let mut daemonize = false;
    let mut pidfile = None;
    for a in &args {
        match a {
            Arg::Help => {
                print!("{}", help());
                std::process::exit(0);
            }
            Arg::Version => {
                let (ma, mi, mc) = rsd::context::QEMU_COMPAT;
                println!(
                    "rsd version {} (qemu-storage-daemon {ma}.{mi}.{mc} compatible)",
                    rsd::context::RSD_VERSION
                );
                std::process::exit(0);
            }
            Arg::Trace(text) => match options::trace(text) {
                Ok(Some(t)) => {
                    for p in &t.patterns {
                        if !observability::TRACE_POINTS
                            .iter()
                            .any(|tp| observability::glob_match(p, tp))
                        {
                            eprintln!(
                                "rsd: {}: warning: trace event '{p}' does not exist",
                                a.location()
                            );
                        }
                    }
                    traces.push(t);
                }
                Ok(None) => {
                    for tp in observability::TRACE_POINTS {
                        println!("{tp}");
                    }
                    std::process::exit(0);
                }
                Err(e) => {
                    eprintln!("rsd: {}: {e}", a.location());
                    std::process::exit(1);
                }
            },
            Arg::Daemonize => daemonize = true,
            Arg::Pidfile(p) => pidfile = Some(p.clone()),
            _ => {}
        }
    }
    // Fork before the runtime (or the trace exporter) creates any thread.
    let daemon = if daemonize {
        match actors::daemonize::start() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("rsd: cannot daemonize: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    observability::init(&traces);
    // Deep stacks: a client may send JSON nested 1024 levels deep, and
    // dropping or cloning such a value recurses.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(16 << 20)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rsd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(daemon::run(
        Options {
            args,
            daemonize,
            pidfile,
        },
        daemon,
    ));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    // Buffered spans go out before the process does.
    observability::traces::shutdown();
    std::process::exit(code);
}
