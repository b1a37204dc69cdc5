//! The examples in `examples/` run as users run them, and print what they promise: a whole
//! test mesh in one process, and two example programs — a hyper server on its mesh address
//! (`serve`) and a hyper client (`fetch`) — each its own peer of a `netbird-proxy dev-mesh`,
//! meeting only through the mesh (the client's peer is forced onto the relay).
//!
//! `cargo test` builds the examples beside this test's binary (target/debug/examples).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh::DevMeshProcess;

/// An example's binary, built by `cargo test` next to ours.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/examples-HASH → target/debug/examples/NAME
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(path.exists(), "{} is not built", path.display());
    path
}

/// A child killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run to completion, at most `limit`: (status, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: kill only sends a signal; a pid that has exited and been reaped may be
        // reused, which the short limits of these tests make harmless in practice.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(killer);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_test_mesh_example_says_hello_across_its_mesh() {
    let (code, out, err) = run_bounded(Command::new(example("test_mesh")), Duration::from_secs(90));
    assert_eq!(code, Some(0), "{out}\n{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello, client"), "{out}");
    let seen = lines.next().unwrap_or_default();
    assert!(
        seen.starts_with("client sees 1 peer(s): server.netbird.test connected "),
        "{out}"
    );
}

#[test]
fn the_fetch_example_gets_a_page_from_the_serve_example_through_the_mesh() {
    let mesh = DevMeshProcess::start(1);
    let mut serve = Command::new(example("serve"));
    serve
        .args(["web", "8080"])
        .env("NB_MANAGEMENT_URL", &mesh.management)
        .env("NB_SETUP_KEY", &mesh.setup_key)
        .env_remove("NB_STATE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut server = Running(serve.spawn().unwrap());
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let line = lines.next().expect("serve printed a line").unwrap();
    assert_eq!(line, "serving http://web.mesh.test:8080/");
    assert!(started.elapsed() < Duration::from_secs(30));

    let mut fetch = Command::new(example("fetch"));
    fetch
        .arg("http://web.mesh.test:8080/hello?from=fetch")
        .env("NB_MANAGEMENT_URL", &mesh.management)
        .env("NB_SETUP_KEY", &mesh.setup_key)
        // The path users take first: through the relay.
        .env("NB_FORCE_RELAY", "true");
    let (code, out, err) = run_bounded(fetch, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}\n{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("200 OK"), "{out}");
    assert_eq!(
        lines.next(),
        Some("Hello from web, a peer inside a Rust program."),
        "{out}"
    );
    let asked = lines.next().unwrap_or_default();
    assert!(
        asked.starts_with("You asked for /hello?from=fetch from 100."),
        "{out}"
    );
}
