//! The container image, built and run as its users run it (issue 21), with podman and no
//! registry (../shared/reference/container.md): podman is installed when missing, a Debian base
//! is made with mmdebstrap from the machine's package mirror, and the suite builds the images
//! docker/Dockerfile describes from a release binary it builds itself — the Debian one from the
//! Dockerfile's final stage with the binary copied in instead of compiled, the minimal one as
//! the Dockerfile's `minimal` stage assembles it (the binary and the libraries `ldd` lists).
//! Then it runs them the way the README says: an unprivileged user, no capabilities, a
//! read-only root, no new privileges, published ports.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const DEBIAN_IMAGE: &str = "localhost/netbird-proxy:suite";
const MINIMAL_IMAGE: &str = "localhost/netbird-proxy:suite-minimal";
const BASE_IMAGE: &str = "debian:bookworm-slim";

/// Where the suite's podman settings and build contexts live.
fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/container")
}

/// podman with the four settings these machines need (container.md), in a file named by
/// CONTAINERS_CONF so nothing under /etc changes.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", work_dir().join("containers.conf"));
    c
}

fn podman_out(args: &[&str]) -> Output {
    podman().args(args).output().expect("podman")
}

/// Run podman; panic with its output unless it succeeds. Returns stdout, trimmed.
fn podman_ok(args: &[&str]) -> String {
    let out = podman_out(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container's log (its standard output and error).
fn logs(name: &str) -> String {
    let out = podman_out(&["logs", name]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The machine's Debian mirror (the first `URIs:` of its apt sources).
fn debian_mirror() -> String {
    std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("URIs:").map(|u| u.trim().to_string()))
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// What the tests share: podman set up, the release binary, both images built.
struct Built {
    binary: PathBuf,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        assert!(
            is_root(),
            "the container tests install podman: run them as root"
        );
        let dir = work_dir();
        std::fs::create_dir_all(&dir).unwrap();
        if Command::new("podman").arg("--version").output().is_err()
            || Command::new("mmdebstrap")
                .arg("--version")
                .output()
                .is_err()
        {
            sh(&["apt-get", "update", "-qq"]);
            run_command(
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args([
                        "podman",
                        "runc",
                        "netavark",
                        "aardvark-dns",
                        "iptables",
                        "mmdebstrap",
                    ]),
            );
        }
        // podman asks for more open files than this machine's hard limit allows.
        let hard = rlimit_nofile_hard();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={hard}:{hard}\", \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\n\
                 [network]\nnetwork_backend = \"netavark\"\n"
            ),
        )
        .unwrap();
        if !podman_out(&["image", "exists", BASE_IMAGE])
            .status
            .success()
        {
            let started = Instant::now();
            let script = format!(
                "mmdebstrap --quiet --variant=minbase bookworm - {} | podman import - {BASE_IMAGE}",
                debian_mirror()
            );
            run_command(
                Command::new("sh")
                    .args(["-c", &script])
                    .env("CONTAINERS_CONF", dir.join("containers.conf")),
            );
            eprintln!("base image {BASE_IMAGE} made in {:?}", started.elapsed());
        }
        // The release binary, stripped, as the Dockerfile's build stage makes it: the one
        // tests/run.sh built before the tests (NB_RELEASE_BIN), or built here in a target
        // directory of its own (the running `cargo test` holds the main one).
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let release = match std::env::var_os("NB_RELEASE_BIN") {
            Some(path) => PathBuf::from(path),
            None => {
                let target = dir.join("build");
                run_command(
                    Command::new(env!("CARGO"))
                        .args(["build", "--release", "--locked", "--bin", "netbird-proxy"])
                        .arg("--target-dir")
                        .arg(&target)
                        .current_dir(root),
                );
                target.join("release/netbird-proxy")
            }
        };
        let binary = dir.join("netbird-proxy");
        std::fs::copy(&release, &binary).unwrap_or_else(|e| panic!("{}: {e}", release.display()));
        sh(&["strip", binary.to_str().unwrap()]);
        let dockerfile = std::fs::read_to_string(root.join("docker/Dockerfile")).unwrap();
        build_debian(&dockerfile, &binary);
        build_minimal(&dockerfile, &binary);
        Built { binary }
    })
}

fn rlimit_nofile_hard() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(4096)
}

/// The lines of the Dockerfile's stage `FROM … AS name` (or the last stage), without FROM.
fn stage<'a>(dockerfile: &'a str, name: Option<&str>) -> Vec<&'a str> {
    let mut stages: Vec<(String, Vec<&str>)> = Vec::new();
    for line in dockerfile.lines() {
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from.split(" AS ").nth(1).unwrap_or("").trim().to_string();
            stages.push((name, Vec::new()));
        } else if let Some((_, lines)) = stages.last_mut() {
            lines.push(line);
        }
    }
    match name {
        Some(n) => stages.into_iter().find(|(s, _)| s == n).expect("stage").1,
        None => stages.pop().expect("a stage").1,
    }
}

/// Build `containerfile` in `ctx` as `tag`, in Docker's format (podman keeps HEALTHCHECK only
/// in it).
fn build_image(ctx: &Path, containerfile: &str, tag: &str) {
    std::fs::write(ctx.join("Containerfile"), containerfile).unwrap();
    podman_ok(&[
        "build",
        "--quiet",
        "--format",
        "docker",
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ]);
}

/// The final stage, on the base made above, with the binary copied in instead of built.
fn build_debian(dockerfile: &str, binary: &Path) {
    let ctx = work_dir().join("debian");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(binary, ctx.join("netbird-proxy")).unwrap();
    let mut file = format!("FROM {BASE_IMAGE}\n");
    let mut copied = false;
    for line in stage(dockerfile, None) {
        if line.starts_with("COPY --from=build") {
            file.push_str("COPY netbird-proxy /usr/local/bin/netbird-proxy\n");
            copied = true;
        } else {
            file.push_str(line);
            file.push('\n');
        }
    }
    assert!(
        copied,
        "the final stage copies the binary from the build stage"
    );
    let started = Instant::now();
    build_image(&ctx, &file, DEBIAN_IMAGE);
    eprintln!("{DEBIAN_IMAGE} built in {:?}", started.elapsed());
}

/// The `minimal` stage: its root assembled here as the build stage's RUN does (the binary, the
/// libraries `ldd` lists, a state directory), its other lines as written.
fn build_minimal(dockerfile: &str, binary: &Path) {
    let ctx = work_dir().join("minimal");
    let _ = std::fs::remove_dir_all(&ctx);
    let rootfs = ctx.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/local/bin")).unwrap();
    std::fs::copy(binary, rootfs.join("usr/local/bin/netbird-proxy")).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = rootfs.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(lib).unwrap(), &to).unwrap();
    }
    for d in ["var/lib/netbird-proxy", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
        sh(&["chmod", "1777", rootfs.join(d).to_str().unwrap()]);
    }
    let mut file = String::from("FROM scratch\n");
    for line in stage(dockerfile, Some("minimal")) {
        if line.starts_with("COPY --from=build /rootfs/") {
            file.push_str("COPY rootfs/ /\n");
        } else {
            file.push_str(line);
            file.push('\n');
        }
    }
    build_image(&ctx, &file, MINIMAL_IMAGE);
}

/// A container removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman_out(&["rm", "-f", "-t", "0", &self.0]);
    }
}

/// The flags the README gives for running the image.
const LOCKED_DOWN: &[&str] = &[
    "--user",
    "65534:65534",
    "--cap-drop=ALL",
    "--read-only",
    "--security-opt",
    "no-new-privileges",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A value of a `/proc/PID/status` line.
fn proc_status(pid: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// The demo's page, served by its `web` peer, and what it says.
const PAGE: &str = "http://web.netbird.test/";
const GREETING: &str = "Hello from the NetBird mesh";

/// The demo in the image answers through published SOCKS5 and HTTP ports; returns how long it
/// took from `podman run` to the first answer.
fn demo_answers(image: &str, name: &str) -> (Container, Duration) {
    let (socks, http) = (free_port(), free_port());
    let started = Instant::now();
    let publish = [
        format!("127.0.0.1:{socks}:1080"),
        format!("127.0.0.1:{http}:3128"),
    ];
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(LOCKED_DOWN);
    args.extend(["-p", &publish[0], "-p", &publish[1], image]);
    args.extend(["demo", "--socks", "0.0.0.0:1080", "--http", "0.0.0.0:3128"]);
    let _ = podman_out(&["rm", "-f", "-t", "0", name]);
    podman_ok(&args);
    let c = Container(name.to_string());
    let socks_proxy = format!("socks5h://127.0.0.1:{socks}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (code, body, _) = curl(&["-s", "--max-time", "2", "-x", &socks_proxy, PAGE]);
        if code == 0 && String::from_utf8_lossy(&body).contains(GREETING) {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{image}: the demo never answered through SOCKS5\n{}",
            logs(name)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let http_proxy = format!("http://127.0.0.1:{http}");
    let (code, body, err) = curl(&["-s", "--max-time", "5", "-x", &http_proxy, PAGE]);
    assert!(
        code == 0 && String::from_utf8_lossy(&body).contains(GREETING),
        "{image}: HTTP proxy: {err}"
    );
    (c, ready)
}

#[test]
fn the_image_runs_locked_down_answers_is_healthy_and_stops_on_sigterm() {
    let built = built();
    let (c, ready) = demo_answers(DEBIAN_IMAGE, "nbp-suite-demo");
    eprintln!("{DEBIAN_IMAGE}: the demo answered {ready:?} after podman run");
    // Inside: nobody, no effective capabilities, no new privileges.
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &c.0]);
    assert_eq!(
        proc_status(&pid, "Uid").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(proc_status(&pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(&pid, "NoNewPrivs"), "1");
    // The image's HEALTHCHECK passes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !podman_out(&["healthcheck", "run", &c.0]).status.success() {
        assert!(Instant::now() < deadline, "never healthy\n{}", logs(&c.0));
        std::thread::sleep(Duration::from_millis(300));
    }
    // SIGTERM: gone within 2 s, exit status 0.
    let stop = Instant::now();
    podman_ok(&["kill", "--signal", "TERM", &c.0]);
    let status = podman_ok(&["wait", &c.0]);
    let took = stop.elapsed();
    assert_eq!(status, "0", "exit status after SIGTERM");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    eprintln!("SIGTERM to exit: {took:?}");
    drop(c);

    // The minimal image: the same run, and small.
    let (c, ready) = demo_answers(MINIMAL_IMAGE, "nbp-suite-minimal");
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", MINIMAL_IMAGE])
        .parse()
        .unwrap();
    eprintln!(
        "{MINIMAL_IMAGE}: {:.1} MB, the demo answered {ready:?} after podman run (binary {:.1} MB)",
        size as f64 / 1e6,
        std::fs::metadata(&built.binary).unwrap().len() as f64 / 1e6
    );
    assert!(size <= 20_000_000, "the minimal image is {size} bytes");
    // No shell in it, and its HEALTHCHECK passes all the same (exec form).
    assert!(
        !podman_out(&["exec", &c.0, "sh", "-c", "true"])
            .status
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !podman_out(&["healthcheck", "run", &c.0]).status.success() {
        assert!(Instant::now() < deadline, "the minimal image never healthy");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(c);
}

/// Our peer's public key from the status endpoint, once the engine runs.
fn own_key(status_port: u16, container: &str) -> String {
    let url = format!("http://127.0.0.1:{status_port}/status");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body, _) = curl(&["-s", "--max-time", "2", &url]);
        if code == 0
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(key) = v["local"]["public_key"].as_str()
        {
            return key.to_string();
        }
        assert!(Instant::now() < deadline, "no status\n{}", logs(container));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A peer in the image keeps its identity in the state volume: restarted, it is the same peer
/// (one key, one registration), as a pod that restarts must be.
#[test]
fn the_state_volume_keeps_the_peer_identity_across_a_restart() {
    use std::io::{BufRead, BufReader};
    built();
    // A dev mesh on the host; the container on the host's network reaches it on loopback.
    let mut mesh = std::process::Command::new(binary())
        .args(["dev-mesh", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(mesh.stdout.take().unwrap()).lines();
    let management = lines.next().unwrap().unwrap();
    let key = lines.next().unwrap().unwrap();
    let management = management.trim_start_matches("management ").to_string();
    let key = key.trim_start_matches("setup-key ").to_string();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _mesh = Kill(mesh);

    let volume = "nbp-suite-state";
    let _ = podman_out(&["volume", "rm", "-f", volume]);
    podman_ok(&["volume", "create", volume]);
    let status_port = free_port();
    let status_addr = format!("127.0.0.1:{status_port}");
    let mount = format!("{volume}:/var/lib/netbird-proxy");
    let mut keys = Vec::new();
    for run in 0..2 {
        let name = "nbp-suite-state";
        let _ = podman_out(&["rm", "-f", "-t", "0", name]);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-v",
            &mount,
        ];
        args.extend(LOCKED_DOWN);
        args.extend(["-e", "NB_SETUP_KEY", DEBIAN_IMAGE]);
        args.extend(["--management-url", &management, "--hostname", "suite-state"]);
        args.extend(["--status-addr", &status_addr]);
        let out = podman()
            .args(&args)
            .env("NB_SETUP_KEY", &key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Container(name.to_string());
        keys.push(own_key(status_port, &c.0));
        podman_ok(&["stop", "-t", "5", &c.0]);
    }
    let _ = podman_out(&["volume", "rm", "-f", volume]);
    assert_eq!(keys[0], keys[1], "the same peer after a restart");
}

/// A stand-in for an image a registry would give: the Debian base with `package`, running
/// the same commands (`entrypoint`, as the original image's).
fn stand_in(tag: &str, package: &str, entrypoint: Option<&str>) -> String {
    let image = format!("localhost/suite-{tag}");
    if podman_out(&["image", "exists", &image]).status.success() {
        return image;
    }
    let ctx = work_dir().join(format!("stand-in-{tag}"));
    std::fs::create_dir_all(&ctx).unwrap();
    let mut file = format!(
        "FROM {BASE_IMAGE}\nRUN apt-get update && apt-get install -y --no-install-recommends \
         {package} && rm -rf /var/lib/apt/lists/*\n"
    );
    if let Some(e) = entrypoint {
        file.push_str(&format!("ENTRYPOINT [\"{e}\"]\n"));
    }
    std::fs::write(ctx.join("Containerfile"), file).unwrap();
    podman_ok(&["build", "--quiet", "-t", &image, ctx.to_str().unwrap()]);
    image
}

/// Containers and a network, removed on drop.
struct Stack {
    containers: Vec<String>,
    network: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in self.containers.iter().rev() {
            let _ = podman_out(&["rm", "-f", "-t", "0", c]);
        }
        let _ = podman_out(&["network", "rm", "-f", &self.network]);
    }
}

/// docker/compose.yaml run as written, with podman: one network with name resolution and a
/// container per service with the file's command, environment, ports, volumes, capabilities,
/// security options, network mode and health checks. Two things differ, and only these: the
/// images a registry would give (python, curl) are stand-ins built here from the Debian base
/// that run the same commands, and the published ports are free ones (the file's 1080 and
/// 3128 may be taken on a machine running other tests).
#[test]
fn the_compose_example_runs_with_every_service_healthy() {
    built();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let services = compose_services(&root.join("docker/compose.yaml"));
    let prefix = "nbp-suite-compose";
    let mut stack = Stack {
        containers: Vec::new(),
        network: format!("{prefix}-net"),
    };
    let _ = podman_out(&["network", "rm", "-f", &stack.network]);
    podman_ok(&["network", "create", &stack.network]);
    let name_of = |svc: &str| format!("{prefix}-{svc}");
    let mut published = Vec::new();
    let mut client_output = None;
    for (svc, spec) in &services {
        let name = name_of(svc);
        let _ = podman_out(&["rm", "-f", "-t", "0", &name]);
        let mut args: Vec<String> = vec!["run".into(), "--name".into(), name.clone()];
        let image = spec["image"].as_str().unwrap();
        let is_client = image.starts_with("curlimages/curl");
        if !is_client {
            args.push("-d".into());
        }
        match spec.get("network_mode").and_then(|m| m.as_str()) {
            Some(mode) => {
                let of = mode
                    .strip_prefix("service:")
                    .expect("network_mode: service:X");
                args.push(format!("--network=container:{}", name_of(of)));
            }
            None => {
                args.push(format!("--network={}", stack.network));
                args.push(format!("--network-alias={svc}"));
            }
        }
        for cap in strings(&spec["cap_drop"]) {
            args.push(format!("--cap-drop={cap}"));
        }
        for opt in strings(&spec["security_opt"]) {
            args.push("--security-opt".into());
            args.push(opt.trim_end_matches(":true").to_string());
        }
        if let Some(env) = spec.get("environment").and_then(|e| e.as_object()) {
            for (k, v) in env {
                args.push("-e".into());
                args.push(format!("{k}={}", v.as_str().unwrap()));
            }
        }
        for p in strings(&spec["ports"]) {
            let container_port = p.rsplit(':').next().unwrap().to_string();
            let host = free_port();
            published.push((container_port.clone(), host));
            args.push("-p".into());
            args.push(format!("127.0.0.1:{host}:{container_port}"));
        }
        for v in strings(&spec["volumes"]) {
            let (src, rest) = v.split_once(':').unwrap();
            let src = root.join("docker").join(src);
            args.push("-v".into());
            args.push(format!("{}:{rest}", src.display()));
        }
        let hc = spec.get("healthcheck");
        if hc.and_then(|h| h["disable"].as_bool()) == Some(true) {
            args.push("--no-healthcheck".into());
        } else if let Some(test) = hc.map(|h| strings(&h["test"])).filter(|t| !t.is_empty()) {
            assert_eq!(test[0], "CMD", "{svc}: healthcheck test");
            args.push(format!(
                "--health-cmd={}",
                serde_json::to_string(&test[1..]).unwrap()
            ));
        }
        args.push(if image == "netbird-proxy:dev" {
            DEBIAN_IMAGE.to_string()
        } else if image.starts_with("python:") {
            stand_in("python", "python3", None)
        } else if is_client {
            stand_in("curl", "curl ca-certificates", Some("curl"))
        } else {
            panic!("service {svc}: no way to run image {image} here; teach tests/container.rs")
        });
        args.extend(strings(&spec["command"]));
        // Services another one waits on to be healthy are waited for before going on.
        if let Some(deps) = spec.get("depends_on").and_then(|d| d.as_object()) {
            for (dep, cond) in deps {
                if cond["condition"] == "service_healthy" {
                    wait_healthy(&name_of(dep));
                }
            }
        }
        let out = podman().args(&args).output().unwrap();
        stack.containers.push(name.clone());
        if is_client {
            client_output = Some(out);
        } else {
            assert!(
                out.status.success(),
                "{svc}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let client = client_output.expect("a client service");
    let page = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success() && page.contains(GREETING),
        "the client printed {page:?}: {}\n{}",
        String::from_utf8_lossy(&client.stderr),
        logs(&name_of("proxy"))
    );
    // Every service with a health check is healthy (the dev mesh's too).
    for (svc, _) in services
        .iter()
        .filter(|(s, _)| s != "client" && s != "page")
    {
        wait_healthy(&name_of(svc));
    }
    // And the published proxy answers from the host.
    let socks = published
        .iter()
        .find(|(p, _)| p == "1080")
        .expect("1080 published")
        .1;
    let (code, body, err) = curl(&[
        "-s",
        "--max-time",
        "10",
        "--socks5-hostname",
        &format!("127.0.0.1:{socks}"),
        "http://web.netbird.test/",
    ]);
    assert!(
        code == 0 && String::from_utf8_lossy(&body).contains(GREETING),
        "{err}"
    );
    drop(stack);
}

/// Wait until the container's health check passes (60 s at most).
fn wait_healthy(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !podman_out(&["healthcheck", "run", name]).status.success() {
        assert!(
            Instant::now() < deadline,
            "{name} never became healthy\n{}",
            logs(name)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
