//! `netbird-proxy exec` (issue "Operations and everyday use", acceptance 3): a command run
//! through the mesh with the proxy variables set, its exit status passed on, signals passed
//! to it, and a peer this run registered logged out again.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh::*;
use common::*;

/// `netbird-proxy exec` joining `mesh` as `name`, running `cmd`.
fn exec(mesh: &DevMeshProcess, state: &std::path::Path, name: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(["exec", "--management-url", &mesh.management])
        .args(["--hostname", name, "--log-level", "warn"])
        .arg("--state")
        .arg(state.join(name))
        .arg("--")
        .args(cmd)
        .env("NB_SETUP_KEY", &mesh.setup_key);
    c
}

#[test]
fn exec_runs_curl_through_the_mesh_and_passes_on_exit_codes_and_signals() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("exec");
    let web = LocalServer::start("exec-web");
    std::fs::write(web.dir.join("index.html"), b"page through exec\n").unwrap();
    // An HTTP/1.0 origin too (Python's plain http.server), on bravo's mesh port 81.
    let old_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut http10 = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &old_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(&web.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", old_port)).is_ok(),
        "python http.server",
    );
    let _bravo = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            "--expose",
            &format!("80={}", web.port),
            "--expose",
            &format!("81=127.0.0.1:{old_port}"),
        ],
    );

    // The page, through the variables exec sets (curl reads ALL_PROXY/http_proxy itself).
    let out = exec(
        &mesh,
        &state.0,
        "alpha",
        &[
            "sh",
            "-c",
            "echo \"$ALL_PROXY $HTTP_PROXY $NO_PROXY ${NB_SETUP_KEY:-unset}\" >&2; \
             curl -sS --max-time 20 http://bravo.mesh.test/index.html",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(out.stdout, b"page through exec\n", "{err}");
    assert!(err.contains("socks5h://127.0.0.1:"), "{err}");
    assert!(err.contains(" http://127.0.0.1:"), "{err}");
    // Without listeners given, SOCKS5 and HTTP share one port.
    let port_after = |prefix: &str| -> String {
        let rest = &err[err.find(prefix).unwrap() + prefix.len()..];
        rest.chars().take_while(|c| c.is_ascii_digit()).collect()
    };
    assert_eq!(
        port_after("socks5h://127.0.0.1:"),
        port_after(" http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("localhost,127.0.0.1,::1 unset"),
        "NO_PROXY without ::1, or the setup key leaked: {err}"
    );
    // Port 0 asked for: the variables carry the ports the listeners got.
    let mut c = Command::new(binary());
    c.args(["exec", "--management-url", &mesh.management])
        .args(["--hostname", "alpha", "--log-level", "warn"])
        .args(["--socks", "0", "--http", "127.0.0.1:0", "--state"])
        .arg(state.0.join("alpha"))
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$ALL_PROXY $HTTP_PROXY\" >&2; \
             curl -sS --max-time 20 http://bravo.mesh.test/index.html && \
             curl -sS --max-time 20 --proxy \"$HTTP_PROXY\" http://bravo.mesh.test/index.html && \
             curl -sS --max-time 20 -o /dev/null -w 'version %{http_version}' \
               --proxy \"$HTTP_PROXY\" http://bravo.mesh.test:81/index.html >&2",
        ])
        .env("NB_SETUP_KEY", &mesh.setup_key);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        out.stdout, b"page through exec\npage through exec\n",
        "{err}"
    );
    assert!(
        !err.contains(":0 ") && !err.contains(":0\n"),
        "port 0 exported: {err}"
    );
    assert!(
        err.contains("version 1.1"),
        "an HTTP/1.0 origin's status line reached the client: {err}"
    );
    let _ = http10.kill();
    let _ = http10.wait();
    // This run registered alpha, so it logged alpha out and dropped the dead key.
    assert!(!state.0.join("alpha").exists(), "{err}");

    // curl's own exit status comes back: 22 for an HTTP error with --fail.
    let out = exec(
        &mesh,
        &state.0,
        "alpha",
        &[
            "curl",
            "-s",
            "--fail",
            "--max-time",
            "20",
            "http://bravo.mesh.test/missing",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(22),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = exec(&mesh, &state.0, "alpha", &["sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));

    // SIGTERM to exec reaches the command, which decides how to end.
    let marker = state.0.join("got-term");
    let started = state.0.join("started");
    let script = format!(
        "trap 'echo term > {m}; exit 3' TERM; touch {s}; while :; do sleep 0.1; done",
        m = marker.display(),
        s = started.display()
    );
    let mut child = exec(&mesh, &state.0, "delta", &["sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        || started.exists(),
        "the command to start",
    );
    sh(&["kill", "-TERM", &child.id().to_string()]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "exec did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "term\n");
    assert_eq!(status.code(), Some(3));
}

/// A command that is not there: 127, as a shell says, and the peer still shuts down.
#[test]
fn exec_reports_a_missing_command() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("exec-missing");
    let _bravo = join(&mesh, &state.0, "bravo", &["--socks", "0"]);
    let out = exec(&mesh, &state.0, "alpha", &["/nonexistent/cmd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run `/nonexistent/cmd`"), "{err}");
}
