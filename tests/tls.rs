//! NBD over TLS: tls-creds-x509 and authz objects as QSD has them, the
//! server's STARTTLS with qemu-img, qemu-io and nbdinfo as clients (and
//! the clients it refuses), and the nbd driver mirroring to a TLS export.
//! Certificates are made here with openssl (RSA: QEMU refuses ECDSA).
use std::path::Path;
use std::process::Command;

use crate::common::*;

fn openssl(dir: &Path, argv: &[&str]) {
    let o = Command::new("openssl")
        .args(argv)
        .current_dir(dir)
        .output()
        .expect("openssl (install it: scripts/test.sh does)");
    assert!(
        o.status.success(),
        "openssl {argv:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A certificate `name` signed by the CA in `pki`, for `subj`.
fn issue(pki: &Path, name: &str, subj: &str, purpose: &str, san: &str) {
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    openssl(
        pki,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subj,
        ],
    );
    let ext = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={purpose}\n{san}"
    );
    std::fs::write(pki.join(format!("{name}.ext")), ext).expect("ext");
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// A CA with a server (localhost, 127.0.0.1), a client `O=Test
/// Org,CN=client1` and an intruder `O=Test Org,CN=intruder`.
fn make_ca(pki: &Path) {
    std::fs::create_dir_all(pki).expect("pki dir");
    openssl(
        pki,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/O=Test Org/CN=Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    issue(
        pki,
        "server",
        "/O=Test Org/CN=localhost",
        "serverAuth",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    );
    issue(pki, "client", "/O=Test Org/CN=client1", "clientAuth", "");
    issue(pki, "intruder", "/O=Test Org/CN=intruder", "clientAuth", "");
}

/// The PKI, made once per test run and copied where a test wants it.
fn pki() -> &'static Path {
    static PKI: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    let d = PKI.get_or_init(|| {
        let d = TempDir::new();
        make_ca(&d.path("a"));
        // A second CA, which the first trusts nothing of.
        make_ca(&d.path("b"));
        d
    });
    &d.0
}

fn copy(from: &str, to: &Path, as_name: &str) {
    std::fs::copy(pki().join(from), to.join(as_name)).expect("copy pki file");
}

/// Credential directories under `dir`: srv (server), cli (client1),
/// bad (intruder), nocert (CA only), alien (client1's key with a
/// certificate from the other CA), mismatch (server cert, client key).
fn creds(dir: &TempDir) {
    for d in ["srv", "cli", "bad", "nocert", "alien", "mismatch", "empty"] {
        std::fs::create_dir_all(dir.path(d)).expect("dir");
    }
    for d in ["srv", "cli", "bad", "nocert", "mismatch"] {
        copy("a/ca-cert.pem", &dir.path(d), "ca-cert.pem");
    }
    copy("a/server-cert.pem", &dir.path("srv"), "server-cert.pem");
    copy("a/server-key.pem", &dir.path("srv"), "server-key.pem");
    copy("a/client-cert.pem", &dir.path("cli"), "client-cert.pem");
    copy("a/client-key.pem", &dir.path("cli"), "client-key.pem");
    copy("a/intruder-cert.pem", &dir.path("bad"), "client-cert.pem");
    copy("a/intruder-key.pem", &dir.path("bad"), "client-key.pem");
    copy("b/ca-cert.pem", &dir.path("alien"), "ca-cert.pem");
    copy("a/server-cert.pem", &dir.path("alien"), "server-cert.pem");
    copy("a/server-key.pem", &dir.path("alien"), "server-key.pem");
    copy(
        "a/server-cert.pem",
        &dir.path("mismatch"),
        "server-cert.pem",
    );
    copy("a/client-key.pem", &dir.path("mismatch"), "server-key.pem");
}

/// object-add of tls-creds-x509 (and its errors), qom-list/qom-get,
/// nbd-server-start with TLS credentials of the wrong kind: the same
/// replies from rsd and QSD.
#[test]
fn tls_creds_objects_match_qsd() {
    let steps = [
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"ts","dir":"$D/srv","endpoint":"server"}}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/objects/ts"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/ts","property":"verify-peer"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/ts","property":"endpoint"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/ts","property":"dir"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/ts","property":"priority"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/ts","property":"loaded"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"tc","dir":"$D/cli","verify-peer":false}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tc","property":"endpoint"}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tc","property":"priority","value":"NORMAL"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tc","property":"priority"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e1","endpoint":"server"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e2","dir":"$D/none","endpoint":"server"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e3","dir":"$D/cli","endpoint":"server"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e4","dir":"$D/alien","endpoint":"server"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e5","dir":"$D/mismatch","endpoint":"server"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e6","dir":"$D/empty"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e7","dir":"$D/srv","endpoint":"sideways"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"e8","dir":"$D/srv","endpoint":"server","passwordid":"nope"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}},"tls-creds":"tc"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}},"tls-creds":"io"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}},"tls-creds":"nope"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}},"tls-creds":"ts","tls-authz":"later"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"ts"}}"#,
        r#"{"execute":"nbd-server-stop"}"#,
    ];
    let out = same_on_both(&creds, &[], &steps).expect("daemon starts");
    assert!(out[0].contains(r#"{"return": {}}"#), "{}", out[0]);
    assert!(
        out[6].contains("Property 'tls-creds-x509.loaded' not found"),
        "{}",
        out[6]
    );
    assert!(
        out[13].contains("server-cert.pem: No such file or directory"),
        "{}",
        out[13]
    );
    assert!(
        out[14].contains("The certificate hasn't got a known issuer"),
        "{}",
        out[14]
    );
    assert!(
        out[15].contains("The certificate and the given key do not match."),
        "{}",
        out[15]
    );
    assert!(
        out[20].contains("Expected TLS credentials for a server endpoint"),
        "{}",
        out[20]
    );
    assert!(out[23].contains(r#"{"return": {}}"#), "{}", out[23]);
}

/// authz-simple and authz-list: creation, their properties and errors,
/// as QSD answers them.
#[test]
fn authz_objects_match_qsd() {
    let steps = [
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-simple","id":"a1","identity":"CN=x"}}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/objects/a1"}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/a1","property":"identity","value":"CN=y"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/a1","property":"identity"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-simple","id":"a2"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"l1","policy":"deny","rules":[{"match":"CN=*","policy":"allow","format":"glob"},{"match":"CN=x","policy":"deny"}]}}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/objects/l1"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/l1","property":"rules"}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/l1","property":"policy","value":"allow"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/l1","property":"policy"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"l2"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/l2","property":"rules"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"l3","rules":[{"policy":"allow"}]}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"l4","policy":"maybe"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-list-file","id":"f1","filename":"/x"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"authz-pam","id":"p1","service":"x"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"l1"}}"#,
    ];
    let out = same_on_both(&|_| {}, &[], &steps).expect("daemon starts");
    assert_eq!(out[3].trim(), r#"{"return": "CN=y"}"#);
    assert!(out[7].contains(r#""match": "CN=*""#), "{}", out[7]);
}

/// A daemon serving `img` as "exp" over TLS with `authz` (an --object),
/// and its stderr's "option negotiation failed" lines once it quits.
struct TlsServer {
    daemon: Daemon,
    qmp: Qmp,
}

impl TlsServer {
    fn start(which: Which, dir: &TempDir, img: &str, addr: &str, authz: &str) -> TlsServer {
        let mut a = monitor_args(&dir.s(&format!("{}.qmp", which.prog())));
        if which == Which::Rsd {
            // Every trace point on: the key must still not show.
            a.extend(args(&["-T", "*"]));
        }
        a.extend(args(&[
            "--object",
            &format!("tls-creds-x509,id=ts,dir={},endpoint=server", dir.s("srv")),
            "--object",
            authz,
            "--blockdev",
            &format!("driver=file,filename={img},node-name=n"),
            "--nbd-server",
            &format!("{addr},tls-creds=ts,tls-authz=az"),
            "--export",
            "type=nbd,id=e,node-name=n,name=exp,writable=on",
        ]));
        let daemon = Daemon::spawn(which, &a);
        let qmp = Qmp::ready(&dir.path(&format!("{}.qmp", which.prog())));
        TlsServer { daemon, qmp }
    }

    /// Quits and gives the refusals it printed, without the program
    /// name; checks that no line of the server's key is in its output.
    fn refusals(mut self, which: Which, dir: &TempDir) -> Vec<String> {
        self.qmp.send(br#"{"execute":"quit"}"#);
        assert_eq!(self.daemon.wait_exit(20), Some(0));
        let text = self.daemon.stderr_text();
        let key = std::fs::read_to_string(dir.path("srv/server-key.pem")).expect("key");
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "{which:?} printed its private key");
        }
        text.lines()
            .filter_map(|l| l.strip_prefix(which.prog()))
            .filter(|l| l.starts_with(": option negotiation failed"))
            .map(str::to_string)
            .collect()
    }
}

fn tls_opts(dir: &TempDir, sock: &str, creds: &str) -> (String, String) {
    (
        format!("tls-creds-x509,id=tc,dir={},endpoint=client", dir.s(creds)),
        format!("driver=nbd,server.type=unix,server.path={sock},export=exp,tls-creds=tc,tls-hostname=localhost"),
    )
}

/// qemu-io writes and reads back over TLS, qemu-img copies the export
/// out and nbdinfo sees it; a client whose certificate the authz refuses,
/// one with no certificate and a plaintext client are refused, and the
/// server says why in QSD's words (compared line for line with QSD).
#[test]
fn tls_clients_are_served_or_refused_as_by_qsd() {
    let mut printed = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        creds(&dir);
        let img = dir.s("disk.raw");
        make_image(&img, "raw", "4M", None);
        let sock = dir.s("n.sock");
        let srv = TlsServer::start(
            which,
            &dir,
            &img,
            &format!("addr.type=unix,addr.path={sock}"),
            "authz-simple,id=az,identity=O=Test Org,,CN=client1",
        );
        let (obj, opts) = tls_opts(&dir, &sock, "cli");
        ok(&run(
            "qemu-io",
            &[
                "--object",
                &obj,
                "--image-opts",
                &opts,
                "-c",
                "write -q -P 0x3c 64k 1M",
                "-c",
                "read -q -P 0x3c 64k 1M",
            ],
        ));
        let copy = dir.s("copy.raw");
        ok(&run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                "--object",
                &obj,
                "--image-opts",
                &opts,
                &copy,
            ],
        ));
        let uri = format!(
            "nbds+unix:///exp?socket={sock}&tls-certificates={}",
            dir.s("cli")
        );
        let info = ok(&run("nbdinfo", &[&uri]));
        assert!(
            info.contains("with TLS") && info.contains("export-size: 4194304"),
            "{info}"
        );
        // Refused: the intruder, no certificate, plaintext.
        let (bad_obj, bad_opts) = tls_opts(&dir, &sock, "bad");
        let o = run(
            "qemu-img",
            &["info", "--object", &bad_obj, "--image-opts", &bad_opts],
        );
        assert!(!o.status.success());
        let (no_obj, no_opts) = tls_opts(&dir, &sock, "nocert");
        let o = run(
            "qemu-img",
            &["info", "--object", &no_obj, "--image-opts", &no_opts],
        );
        assert!(!o.status.success());
        let plain = format!("driver=nbd,server.type=unix,server.path={sock},export=exp");
        let o = run("qemu-img", &["info", "--image-opts", &plain]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("server reported: Option 0x7 not permitted before TLS"),
            "{err}"
        );
        let o = run("nbdinfo", &[&format!("nbd+unix:///exp?socket={sock}")]);
        assert!(!o.status.success());
        let lines = srv.refusals(which, &dir);
        assert!(
            lines.contains(&": option negotiation failed: TLS x509 authz check for O=Test Org,CN=intruder is denied".to_string()),
            "{which:?}: {lines:?}"
        );
        assert!(
            lines.contains(
                &": option negotiation failed: Verify failed: No certificate was found."
                    .to_string()
            ),
            "{which:?}: {lines:?}"
        );
        // The data went through TLS both ways.
        let cmp = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &img, &copy],
        );
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "read -q -P 0x3c 64k 1M", &img],
        ));
        printed.push(lines);
    }
    if printed.len() == 2 {
        assert_eq!(printed[0], printed[1], "rsd's refusals, then QSD's");
    }
}

/// authz-list with a glob and authz-list-file (rsd's `authz-listfile`)
/// reread when the file changes: a client is let in, then shut out.
#[test]
fn authz_list_glob_and_file_refresh() {
    let dir = TempDir::new();
    creds(&dir);
    let img = dir.s("disk.raw");
    make_image(&img, "raw", "1M", None);
    let sock = dir.s("n.sock");
    let rules = dir.s("rules.json");
    let allow = r#"{"policy": "deny", "rules": [{"match": "O=Test Org,CN=client?", "policy": "allow", "format": "glob"}]}"#;
    std::fs::write(&rules, allow).expect("rules");
    let srv = TlsServer::start(
        Which::Rsd,
        &dir,
        &img,
        &format!("addr.type=unix,addr.path={sock}"),
        &format!("authz-listfile,id=az,filename={rules}"),
    );
    let (obj, opts) = tls_opts(&dir, &sock, "cli");
    ok(&run(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &opts],
    ));
    let (bad_obj, bad_opts) = tls_opts(&dir, &sock, "bad");
    assert!(!run(
        "qemu-img",
        &["info", "--object", &bad_obj, "--image-opts", &bad_opts]
    )
    .status
    .success());
    // Written anew (a new inode, as editors do): the next client sees it.
    let tmp = dir.s("rules.new");
    std::fs::write(&tmp, r#"{"policy": "deny", "rules": []}"#).expect("rules");
    std::fs::rename(&tmp, &rules).expect("rename");
    assert!(!run(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &opts]
    )
    .status
    .success());
    let lines = srv.refusals(Which::Rsd, &dir);
    assert_eq!(
        lines,
        vec![
            ": option negotiation failed: TLS x509 authz check for O=Test Org,CN=intruder is denied",
            ": option negotiation failed: TLS x509 authz check for O=Test Org,CN=client1 is denied",
        ]
    );
}

/// The nbd driver with tls-creds: rsd mirrors to a TLS export (of
/// another rsd, over TCP, checking the server's name); the target then
/// equals the source. Without tls-creds it is refused in QEMU's words.
#[test]
fn mirror_to_a_tls_export() {
    let dir = TempDir::new();
    creds(&dir);
    let (src, tgt) = (dir.s("src.qcow2"), dir.s("tgt.raw"));
    make_image(&src, "qcow2", "16M", Some((0x5a, "6M")));
    make_image(&tgt, "raw", "16M", None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let srv = TlsServer::start(
        Which::Rsd,
        &dir,
        &tgt,
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "authz-list,id=az,policy=allow",
    );
    let mut a = monitor_args(&dir.s("a.sock"));
    a.extend(args(&[
        "--object",
        &format!("tls-creds-x509,id=tc,dir={},endpoint=client", dir.s("cli")),
        "--blockdev",
        &format!("driver=qcow2,node-name=src,file.driver=file,file.filename={src}"),
    ]));
    let mut da = Daemon::spawn(Which::Rsd, &a);
    let mut qa = Qmp::ready(&dir.path("a.sock"));
    let plain = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"nbd","node-name":"p","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"export":"exp"}}}}"#
    );
    let r = qa.cmd(&plain);
    assert_eq!(
        r["error"]["desc"], "TLS negotiation required before option 7 (go)",
        "{r}"
    );
    let add = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"nbd","node-name":"remote","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"export":"exp","tls-creds":"tc"}}}}"#
    );
    let r = qa.cmd(&add);
    assert!(r.get("return").is_some(), "{r}");
    let r = qa.cmd(r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"remote","sync":"full"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_ready(&mut qa);
    let r = qa.cmd(r#"{"execute":"job-complete","arguments":{"id":"m"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_no_jobs(&mut qa);
    let r = qa.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"remote"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    qa.send(br#"{"execute":"quit"}"#);
    assert_eq!(da.wait_exit(20), Some(0));
    let _ = srv.refusals(Which::Rsd, &dir);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &src, &tgt],
    );
    assert!(
        cmp.status.success(),
        "{}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

/// tls-creds-psk and tls-creds-anon are refused by name; their keys
/// never show in rsd's messages.
#[test]
fn psk_and_anon_are_refused() {
    let dir = TempDir::new();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    for t in ["tls-creds-psk", "tls-creds-anon"] {
        let r = q.cmd(&format!(
            r#"{{"execute":"object-add","arguments":{{"qom-type":"{t}","id":"x","dir":"/tmp"}}}}"#
        ));
        let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
        assert!(
            desc.starts_with(&format!("rsd does not support '{t}'")),
            "{desc}"
        );
    }
}
