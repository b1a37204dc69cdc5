//! `netbird-proxy nc` (issue 18, item 3) with the programs it is for: OpenSSH's ssh, scp and
//! git over ssh, run as an unprivileged user with `ProxyCommand='netbird-proxy nc %h %p'`,
//! against sshd on a real wireguard-go peer; through a running proxy, and joining a dev mesh
//! itself when none runs.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::mesh::*;
use common::*;

/// sshd in the test bed's namespace on the peer's mesh address, accepting `key` for root.
struct Sshd {
    child: Child,
    key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen");
}

fn start_sshd(bed: &Testbed) -> Sshd {
    let dir = bed.dir.join("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    keygen(&dir.join("host_key"));
    let key = dir.join("client_key");
    keygen(&key);
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    // The client key is used by an unprivileged user, who must own it (ssh checks).
    chown_nobody(&key);
    std::fs::create_dir_all("/run/sshd").unwrap();
    let opt = |o: String| ["-o".to_string(), o];
    let mut args: Vec<String> = vec!["-D".into(), "-e".into(), "-f".into(), "/dev/null".into()];
    for o in [
        format!("ListenAddress={PEER_IP}"),
        "Port=22".into(),
        format!("HostKey={}", dir.join("host_key").display()),
        format!(
            "AuthorizedKeysFile={}",
            dir.join("authorized_keys").display()
        ),
        "PermitRootLogin=prohibit-password".into(),
        "StrictModes=no".into(),
        "UsePAM=no".into(),
        "PidFile=none".into(),
        "Subsystem=sftp internal-sftp".into(),
    ] {
        args.extend(opt(o));
    }
    let child = Command::new("ip")
        .args(["netns", "exec", &bed.ns, "/usr/sbin/sshd"])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("sshd");
    bed.wait_listening(22, "sshd listening");
    Sshd { child, key }
}

/// ssh's options: our key, no host key checks or config, `nc` as the ProxyCommand.
fn ssh_options(key: &Path, nc_args: &str) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        format!("ProxyCommand={} nc {nc_args} %h %p", binary()),
    ]
}

fn run_output(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Item 3 with a running proxy: ssh runs a command, scp copies 20 MiB there and back intact
/// (both finish: half-close is right), and git clones, commits and pushes over ssh; all as an
/// unprivileged user through `nc`.
#[test]
fn ssh_scp_and_git_work_through_nc_and_a_running_proxy() {
    let bed = Testbed::new(BedOptions::default());
    let sshd = start_sshd(&bed);
    let status = free_port_block(1);
    let _proxy = Proxy::start(
        &bed.proxy_config(""),
        &["--socks", "0", "--status-addr", &status.to_string()],
    );
    let nc_args = format!("--status-addr {status}");
    let opts = ssh_options(&sshd.key, &nc_args);
    let target = format!("root@{PEER_IP}");

    let out = run_output(
        as_nobody("ssh")
            .args(&opts)
            .arg(&target)
            .arg("echo hello from $(id -un) on the peer"),
        "ssh",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from root on the peer\n"
    );

    // scp both ways (the SFTP protocol by default), compared byte for byte.
    let work = bed.dir.join("nc-work");
    std::fs::create_dir_all(&work).unwrap();
    chown_nobody(&work);
    let data = random_bytes(20 << 20);
    let local = work.join("big.bin");
    std::fs::write(&local, &data).unwrap();
    chown_nobody(&local);
    let remote = bed.dir.join("remote.bin");
    run_output(
        as_nobody("scp")
            .args(&opts)
            .arg(&local)
            .arg(format!("{target}:{}", remote.display())),
        "scp to the peer",
    );
    assert!(
        std::fs::read(&remote).unwrap() == data,
        "scp to the peer altered the file"
    );
    let back = work.join("back.bin");
    run_output(
        as_nobody("scp")
            .args(&opts)
            .arg(format!("{target}:{}", remote.display()))
            .arg(&back),
        "scp from the peer",
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "scp from the peer altered the file"
    );

    // git over ssh: clone an empty bare repository, commit, push, and see it arrive.
    let bare = bed.dir.join("repo.git");
    run_output(
        Command::new("git")
            .args(["init", "-q", "--bare"])
            .arg(&bare),
        "git init --bare",
    );
    let ssh_command = format!(
        "ssh {}",
        opts.iter()
            .map(|o| format!("'{o}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let git = |args: &[&str], dir: &Path| {
        let mut cmd = as_nobody("git");
        cmd.args(args)
            .current_dir(dir)
            .env("GIT_SSH_COMMAND", &ssh_command)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.test")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.test");
        run_output(&mut cmd, &format!("git {args:?}"))
    };
    git(
        &[
            "clone",
            "-q",
            &format!("{target}:{}", bare.display()),
            "clone",
        ],
        &work,
    );
    let clone = work.join("clone");
    std::fs::write(clone.join("README"), "through nc\n").unwrap();
    chown_nobody(&clone.join("README"));
    git(&["add", "README"], &clone);
    git(&["commit", "-q", "-m", "first"], &clone);
    git(&["push", "-q", "origin", "HEAD:main"], &clone);
    let shown = run_output(
        Command::new("git")
            .arg("--git-dir")
            .arg(&bare)
            .args(["show", "main:README"]),
        "git show",
    );
    assert_eq!(String::from_utf8_lossy(&shown.stdout), "through nc\n");
}

/// Item 3's messages and exit statuses: a refused port is nc's "connect to … failed" and
/// status 1; with no proxy running and nothing to join with, one clear line and status 1.
#[test]
fn nc_failures_are_one_line_and_status_one() {
    let bed = Testbed::new(BedOptions::default());
    let status = free_port_block(1);
    let _proxy = Proxy::start(
        &bed.proxy_config(""),
        &["--socks", "0", "--status-addr", &status.to_string()],
    );
    let out = Command::new(binary())
        .args(["nc", "--status-addr", &status.to_string(), PEER_IP, "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        format!("netbird-proxy nc: connect to {PEER_IP} port 1 (tcp) failed: Connection refused")
    );
    assert!(out.stdout.is_empty());

    let nothing = free_port_block(1);
    let out = Command::new(binary())
        .args(["nc", "--status-addr", &nothing.to_string(), PEER_IP, "22"])
        .env_remove("NB_SETUP_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("no proxy answers at 127.0.0.1:{nothing}"))
            && err.lines().count() == 1,
        "{err}"
    );
}

/// Item 3 without a running proxy: nc joins a dev mesh itself (the relayed path users
/// take), reaches bravo's exposed echo by name, and half-closes: all of 2 MiB comes back and
/// nc exits 0 when bravo's echo closes after our end of input.
#[test]
fn nc_joins_the_mesh_itself_when_no_proxy_runs() {
    let mesh = DevMeshProcess::start(1);
    let state = TempDir::new("nc-mesh");
    let echo = LocalServer::start("bravo");
    let _b = join(
        &mesh,
        &state.0,
        "bravo",
        &[
            "--expose",
            &format!("7000={}", echo.echo_port),
            "--force-relay",
        ],
    );
    let data = random_bytes(2 << 20);
    let unused = free_port_block(1);
    let mut child = Command::new(binary())
        .args(["nc", "--management-url", &mesh.management])
        .args(["--setup-key", &mesh.setup_key, "--hostname", "alpha"])
        .arg("--state")
        .arg(state.0.join("alpha"))
        .args(["--force-relay", "--status-addr", &unused.to_string()])
        .args(["bravo.mesh.test", "7000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
        // End of input: nc half-closes, the echo answers the rest and closes.
    });
    let out = wait_output(child, Duration::from_secs(90));
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        out.stdout == data,
        "{} of {} bytes came back",
        out.stdout.len(),
        data.len()
    );
}

/// The child's output, killing it after `limit`.
fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("nc did not finish within {limit:?}");
        }
    }
}
