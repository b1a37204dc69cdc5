//! No secret in any output (issue "Robustness and security"): a full dev-mesh run with debug
//! logging, proxy passwords used right and wrong, then every log, `/status`, `/metrics`,
//! `status`, `--print-config` and exec's child environment are searched for the setup key,
//! the private keys, the proxy passwords and their Basic-auth encoding.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::mesh::*;
use common::*;

const SOCKS_PASS: &str = "socks-pass-9b1f0c7e";
const HTTP_PASS: &str = "http-pass-4d2a66e1";

fn get(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn private_key(state: &std::path::Path) -> String {
    let text = std::fs::read_to_string(state).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("private_key = "))
        .expect("a private key in the state file")
        .trim()
        .to_string()
}

#[test]
fn no_output_of_a_full_run_contains_a_secret() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("secrets");
    let web = LocalServer::start("secrets-web");
    std::fs::write(web.dir.join("index.html"), b"secret-free page\n").unwrap();
    let status_port = free_port_block(1);
    let b = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            "--expose",
            &format!("80={}", web.port),
            "--log-level",
            "debug",
        ],
    );
    let socks_auth = format!("user:{SOCKS_PASS}");
    let http_auth = format!("user:{HTTP_PASS}");
    let a = join(
        &mesh,
        &state.0,
        "alpha",
        &[
            "--socks",
            "0",
            "--http",
            "0",
            "--socks-auth",
            &socks_auth,
            "--http-auth",
            &http_auth,
            "--status-addr",
            &status_port.to_string(),
            "--log-level",
            "debug",
        ],
    );
    let socks = a.socks.unwrap().to_string();
    let http = a.http.unwrap().to_string();

    // Right and wrong passwords, both proxies.
    let url = "http://bravo.mesh.test/index.html";
    let (code, body, err) = fetch_until_ok(
        &[
            "--socks5-hostname",
            &format!("user:{SOCKS_PASS}@{socks}"),
            url,
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"secret-free page\n"[..]),
        "{err}"
    );
    let (code, _, _) = curl(&[
        "--socks5-hostname",
        &format!("user:wrong-{SOCKS_PASS}@{socks}"),
        url,
    ]);
    assert_ne!(code, 0);
    let (code, body, err) = curl(&["-x", &format!("http://user:{HTTP_PASS}@{http}"), url]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"secret-free page\n"[..]),
        "{err}"
    );
    let (code, _, _) = curl(&[
        "-f",
        "-x",
        &format!("http://user:wrong-{HTTP_PASS}@{http}"),
        url,
    ]);
    assert_ne!(code, 0);

    let mut outputs = vec![
        ("/status".to_string(), get(status_port, "/status")),
        ("/metrics".to_string(), get(status_port, "/metrics")),
        ("/readyz".to_string(), get(status_port, "/readyz")),
    ];
    let status = Command::new(binary())
        .args([
            "status",
            "--detail",
            "--status-addr",
            &status_port.to_string(),
        ])
        .output()
        .unwrap();
    outputs.push((
        "status".into(),
        String::from_utf8_lossy(&status.stdout).into(),
    ));
    let printed = Command::new(binary())
        .args(["--print-config", "--setup-key", &mesh.setup_key])
        .args([
            "--socks",
            "1",
            "--socks-auth",
            &socks_auth,
            "--http-auth",
            &http_auth,
        ])
        .output()
        .unwrap();
    outputs.push((
        "--print-config".into(),
        String::from_utf8_lossy(&printed.stdout).into_owned()
            + &String::from_utf8_lossy(&printed.stderr),
    ));
    // exec's command sees the proxy URLs with its own passwords (it needs them), but never the
    // setup key.
    let exec = Command::new(binary())
        .args([
            "exec",
            "--management-url",
            &mesh.management,
            "--hostname",
            "delta",
        ])
        .arg("--state")
        .arg(state.0.join("delta"))
        .args(["--log-level", "debug", "--", "env"])
        .env("NB_SETUP_KEY", &mesh.setup_key)
        .output()
        .unwrap();
    assert!(
        exec.status.success(),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    outputs.push((
        "exec".into(),
        String::from_utf8_lossy(&exec.stdout).into_owned() + &String::from_utf8_lossy(&exec.stderr),
    ));
    outputs.push(("alpha log".into(), a.log()));
    outputs.push(("bravo log".into(), b.log()));

    let b64 = base64::engine::general_purpose::STANDARD;
    let secrets = [
        ("the setup key", mesh.setup_key.clone()),
        ("alpha's private key", private_key(&state.0.join("alpha"))),
        ("bravo's private key", private_key(&state.0.join("bravo"))),
        ("the SOCKS password", SOCKS_PASS.to_string()),
        ("the HTTP password", HTTP_PASS.to_string()),
        (
            "the HTTP Basic credentials",
            b64.encode(format!("user:{HTTP_PASS}")),
        ),
    ];
    for (what, secret) in &secrets {
        assert!(secret.len() >= 8, "{what} is too short to search for");
        for (name, text) in &outputs {
            assert!(
                !text.contains(secret.as_str()),
                "{what} appears in {name}:\n{text}"
            );
        }
    }
    // The search covered real output, not empty strings.
    for (name, text) in &outputs {
        assert!(text.len() > 20, "{name} is nearly empty: {text}");
    }
}
