//! docker/compose.yaml without Docker (issue "Operations and everyday use"): no Docker engine
//! runs on these machines, so this test runs the commands the compose file and the Dockerfile
//! give — one network namespace per service, service names in each namespace's hosts file,
//! `network_mode: service:X` sharing X's namespace, our processes as the Dockerfile's USER
//! with every capability dropped, the Dockerfile's ENV and HEALTHCHECK — and checks that the
//! client prints the page. Change the compose file and this test runs the change.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const OUR_IMAGE: &str = "netbird-proxy:dev";

/// What the Dockerfile's final stage sets.
struct Image {
    env: Vec<(String, String)>,
    user: String,
    healthcheck: Vec<String>,
}

fn parse_dockerfile(text: &str) -> Image {
    let mut image = Image {
        env: Vec::new(),
        user: String::new(),
        healthcheck: Vec::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ENV ") {
            let (k, v) = rest.split_once('=').expect("ENV KEY=VALUE");
            image.env.push((k.trim().into(), v.trim().into()));
        } else if let Some(rest) = line.strip_prefix("USER ") {
            image.user = rest.trim().into();
        } else if line.starts_with("HEALTHCHECK ") {
            let json = &line[line.find("CMD [").expect("HEALTHCHECK CMD [...]") + 4..];
            image.healthcheck = serde_json::from_str(json).unwrap();
        }
    }
    assert!(
        !image.user.is_empty() && !image.user.starts_with('0'),
        "the image must not run as root"
    );
    image
}

/// The namespaces, processes and files of one run, removed on drop.
struct Stack {
    tag: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            sh_quiet(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        sh_quiet(&["ip", "netns", "del", &format!("{}sw", self.tag)]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_compose_example_serves_the_page_through_the_mesh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = parse_dockerfile(&std::fs::read_to_string(root.join("docker/Dockerfile")).unwrap());
    let services = compose_services(&root.join("docker/compose.yaml"));
    let (uid, gid) = image
        .user
        .split_once(':')
        .unwrap_or((&image.user, &image.user));

    let pid = std::process::id() % 10000;
    let tag = format!("nbc{pid}");
    let dir = std::env::temp_dir().join(format!("netbird-proxy-compose-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let mut stack = Stack {
        tag: tag.clone(),
        namespaces: Vec::new(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    // The image's binary, where the unprivileged user can run it.
    let bin = dir.join("bin/netbird-proxy");
    std::fs::copy(binary(), &bin).unwrap();
    sh(&["chmod", "-R", "a+rX", dir.to_str().unwrap()]);

    // A switch namespace with a bridge; every service with its own network gets a namespace
    // and an address in 198.19.<slot>.0/24.
    let switch = format!("{tag}sw");
    sh_quiet(&["ip", "netns", "del", &switch]);
    sh(&["ip", "netns", "add", &switch]);
    sh(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
    let slot = pid % 250;
    let mut netns: HashMap<String, String> = HashMap::new();
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for (i, (name, svc)) in services.iter().enumerate() {
        if svc.get("network_mode").is_some() {
            continue;
        }
        let ns = format!("{tag}{i}");
        let ip = format!("198.19.{slot}.{}", i + 2);
        sh_quiet(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns]);
        stack.namespaces.push(ns.clone());
        let (a, b) = (format!("{ns}a"), format!("{ns}b"));
        sh(&[
            "ip", "-n", &switch, "link", "add", &a, "type", "veth", "peer", "name", &b,
        ]);
        sh(&["ip", "-n", &switch, "link", "set", &b, "netns", &ns]);
        sh(&[
            "ip", "-n", &switch, "link", "set", &a, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &b,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &b, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        hosts.push_str(&format!("{ip} {name}\n"));
        netns.insert(name.clone(), ns);
    }
    for (name, svc) in &services {
        if let Some(mode) = svc.get("network_mode").and_then(|m| m.as_str()) {
            let of = mode
                .strip_prefix("service:")
                .expect("network_mode: service:X");
            netns.insert(name.clone(), netns[of].clone());
        }
    }
    for ns in &stack.namespaces {
        std::fs::create_dir_all(format!("/etc/netns/{ns}")).unwrap();
        std::fs::write(format!("/etc/netns/{ns}/hosts"), &hosts).unwrap();
    }

    // The command line of a service, as its image would run it.
    let command_of = |name: &str, svc: &serde_json::Value, args: Vec<String>| -> Command {
        let ns = &netns[name];
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        let img = svc["image"].as_str().unwrap();
        if img == OUR_IMAGE {
            let home = dir.join(format!("home-{name}"));
            std::fs::create_dir_all(&home).unwrap();
            sh(&["chown", &format!("{uid}:{gid}"), home.to_str().unwrap()]);
            c.args(["setpriv", "--reuid", uid, "--regid", gid, "--clear-groups"])
                .args([
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "--no-new-privs",
                    "--",
                ])
                .arg("env")
                .arg(format!("PATH={}:/usr/bin:/bin", dir.join("bin").display()));
            for (k, v) in &image.env {
                let v = v.replace("/var/lib/netbird-proxy", home.to_str().unwrap());
                c.arg(format!("{k}={v}"));
            }
            if let Some(env) = svc.get("environment").and_then(|e| e.as_object()) {
                for (k, v) in env {
                    c.arg(format!("{k}={}", v.as_str().unwrap()));
                }
            }
            // The image's ENTRYPOINT, unless the command is a full one (a healthcheck).
            if args.first().map(String::as_str) != Some("netbird-proxy") {
                c.arg("netbird-proxy");
            }
        } else if img.starts_with("curlimages/curl:") {
            c.arg("curl");
        } else if !img.starts_with("python:") {
            panic!("service {name}: no way to run image {img} here; teach tests/compose.rs");
        }
        // Volumes: the container path in the arguments becomes the host path.
        let mut args = args;
        for v in strings(&svc["volumes"]) {
            let mut parts = v.split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            let src = root.join("docker").join(src);
            for a in &mut args {
                if a == dst {
                    *a = src.to_str().unwrap().into();
                }
            }
        }
        c.args(args);
        c
    };
    let healthcheck_of = |svc: &serde_json::Value| -> Option<Vec<String>> {
        let hc = svc.get("healthcheck");
        if hc.and_then(|h| h["disable"].as_bool()) == Some(true) {
            return None;
        }
        match hc.map(|h| strings(&h["test"])).filter(|t| !t.is_empty()) {
            Some(test) => Some(test[1..].to_vec()),
            None if svc["image"] == OUR_IMAGE => Some(image.healthcheck.clone()),
            None => None,
        }
    };
    let wait_healthy = |name: &str, svc: &serde_json::Value| {
        let Some(test) = healthcheck_of(svc) else {
            return;
        };
        let start = Instant::now();
        loop {
            let ok = command_of(name, svc, test.clone())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never became healthy ({test:?})"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    let by_name: HashMap<_, _> = services.iter().cloned().collect();
    let mut client_output = None;
    for (name, svc) in &services {
        // depends_on with condition service_healthy: wait for that service's healthcheck.
        if let Some(deps) = svc.get("depends_on").and_then(|d| d.as_object()) {
            for (dep, how) in deps {
                if how["condition"] == "service_healthy" {
                    wait_healthy(dep, &by_name[dep]);
                }
            }
        }
        let args = strings(&svc["command"]);
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        if name == "client" {
            let out = command_of(name, svc, args).output().unwrap();
            client_output = Some(out);
            break;
        }
        let child = command_of(name, svc, args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        stack.children.push(child);
    }
    let out = client_output.expect("a client service");
    let logs: String = services
        .iter()
        .map(|(n, _)| {
            format!(
                "--- {n}\n{}\n",
                std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default()
            )
        })
        .collect();
    assert!(
        out.status.success(),
        "client: {}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        std::fs::read(root.join("docker/www/index.html")).unwrap(),
        "{logs}"
    );
    // The image's own HEALTHCHECK holds on every service that keeps it.
    for (name, svc) in &services {
        if name != "client" {
            wait_healthy(name, svc);
        }
    }
}
