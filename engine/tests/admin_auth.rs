//! The admin API with tokens: a caller without one gets nothing, a
//! read-only token reads but cannot act, and a refused request changes
//! nothing. The CLI presents the token from RVOL_ADMIN_TOKEN_FILE.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// Sends one request; returns the status code and the body.
fn call(admin: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

fn snapshot_names(admin: &str, token: &str) -> Vec<String> {
    let (code, body) = call(admin, "GET", "/v1/snapshots", Some(token), "");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn control_needs_the_control_token_and_reading_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let control = token_file(tmp.path(), "control", "c0ntrol-secret");
    let read = token_file(tmp.path(), "read", "r3ad-secret");
    let (_engine, _nbd, admin) = start_engine(
        "guarded",
        "16M",
        &addrs(&rs),
        &[
            "--admin-token-file",
            &control,
            "--admin-read-token-file",
            &read,
        ],
    );
    let chain = snapshot_names(&admin, "c0ntrol-secret");
    let controls = [
        ("POST", "/v1/snapshots", r#"{"name":"evil"}"#),
        (
            "DELETE",
            "/v1/replicas",
            &format!(r#"{{"address":"{}"}}"#, rs[0].addr),
        ),
        ("POST", "/v1/volume/expand", r#"{"size":33554432}"#),
        ("POST", "/v1/verify", ""),
    ];
    // No token, or a wrong one: nothing at all, not even status.
    for token in [None, Some("guess"), Some("c0ntrol-secre")] {
        for path in ["/v1/volume", "/metrics"] {
            assert_eq!(
                call(&admin, "GET", path, token, "").0,
                401,
                "{path} {token:?}"
            );
        }
        for (method, path, body) in controls {
            let (code, body) = call(&admin, method, path, token, body);
            assert_eq!(code, 401, "{method} {path} {token:?}: {body}");
            assert!(body.contains("needs a token"), "{body}");
        }
    }
    // The read token reads, and acts on nothing.
    for path in ["/v1/volume", "/v1/replicas", "/v1/snapshots", "/metrics"] {
        assert_eq!(
            call(&admin, "GET", path, Some("r3ad-secret"), "").0,
            200,
            "{path}"
        );
    }
    for (method, path, body) in controls {
        let (code, body) = call(&admin, method, path, Some("r3ad-secret"), body);
        assert_eq!(code, 403, "{method} {path}: {body}");
    }
    // Nothing changed.
    assert_eq!(snapshot_names(&admin, "c0ntrol-secret"), chain);
    let (_, v) = call(&admin, "GET", "/v1/volume", Some("r3ad-secret"), "");
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["size"], 16 << 20);
    let modes: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["RW", "RW", "RW"]);

    // The control token acts; the CLI presents it from the file.
    let (code, body) = call(
        &admin,
        "POST",
        "/v1/snapshots",
        Some("c0ntrol-secret"),
        r#"{"name":"good"}"#,
    );
    assert_eq!(code, 200, "{body}");
    let names = snapshot_names(&admin, "c0ntrol-secret");
    assert!(
        names.contains(&"volume-snap-good.img".to_string()),
        "{names:?}"
    );
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new(RVOL);
        c.args(args);
        c.env_remove("RVOL_ADMIN_TOKEN_FILE");
        if let Some(t) = token {
            c.env("RVOL_ADMIN_TOKEN_FILE", t);
        }
        c.output().unwrap()
    };
    let out = cli(None, &["snapshot", "ls", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = cli(
        Some(&read),
        &["snapshot", "create", "nope", "--admin", &admin],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    let out = cli(
        Some(&control),
        &["snapshot", "create", "cli", "--admin", &admin],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        Some(&read),
        &["snapshot", "ls", "--admin", &admin, "--json"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("volume-snap-cli.img"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("nope"));
}

#[test]
fn a_read_token_without_a_control_token_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let r = ReplicaProc::start(&tmp.path().join("r0"), "16M", "127.0.0.1:0");
    let read = token_file(tmp.path(), "read", "r");
    let empty = token_file(tmp.path(), "empty", "");
    for flags in [
        vec!["--admin-read-token-file", read.as_str()],
        vec!["--admin-token-file", empty.as_str()],
        vec!["--admin-token-file", "/nonexistent/token"],
    ] {
        let mut extra = vec!["--nbd-listen", "127.0.0.1:0"];
        extra.extend(&flags);
        let args = engine_args("x", "16M", std::slice::from_ref(&r.addr), &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(RVOL, &args);
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("token"), "{flags:?}: {err}");
    }
}

/// With --admin-tls the API answers HTTPS only: the CLI verifies it with
/// the CA in RVOL_ADMIN_CA_FILE and sends its token inside TLS; plain HTTP
/// and a client trusting another CA get no answer.
#[test]
fn with_admin_tls_only_https_is_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let rs = unix_replicas(base, 2, "16M");
    let control = token_file(base, "control", "c0ntrol-secret");
    let engine_tls = tls::issue(&["--volume", "guarded-tls", "--ip", "127.0.0.1"]);
    let mut extra: Vec<&str> = engine_tls.iter().map(String::as_str).collect();
    extra.extend(["--admin-tls", "--admin-token-file", &control]);
    let (_engine, _nbd, admin) = start_engine("guarded-tls", "16M", &addrs(&rs), &extra);
    let ca = engine_tls[5].clone();
    let cli = |ca: Option<&str>, token: Option<&str>| {
        let mut c = std::process::Command::new(RVOL);
        c.args(["volume", "status", "--json", "--admin", &admin]);
        c.env_remove("RVOL_ADMIN_TOKEN_FILE")
            .env_remove("RVOL_ADMIN_CA_FILE");
        if let Some(ca) = ca {
            c.env("RVOL_ADMIN_CA_FILE", ca);
        }
        if let Some(t) = token {
            c.env("RVOL_ADMIN_TOKEN_FILE", t);
        }
        c.output().unwrap()
    };
    let out = cli(Some(&ca), Some(&control));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"guarded-tls\""));
    // Inside TLS, still no token, no answer.
    let out = cli(Some(&ca), None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // Plain HTTP: no HTTP reply at all, and the CLI says what to do.
    let out = cli(None, Some(&control));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RVOL_ADMIN_CA_FILE"));
    let mut s = TcpStream::connect(&admin).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let _ = write!(
        s,
        "GET /v1/volume HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\n\r\n"
    );
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "{got:?}"
    );
    // A client that trusts another CA does not send its token.
    let other = base.join("other-ca");
    run_ok(RVOL, &["cert", "ca", "--dir", other.to_str().unwrap()]);
    let out = cli(other.join("ca.crt").to_str(), Some(&control));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid peer certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
