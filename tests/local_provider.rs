//! The local provider on this host: network namespaces, bridges and taps for
//! real, QEMU replaced by a stand-in script for the lifecycle tests, and one
//! real VM (TCG) for the end-to-end test.
//!
//! Root is required (network namespaces, tap devices); CI runs as root. Every
//! namespace these tests make is named after the test process
//! (`kiln-t<pid>-…`) and removed by them; nothing else is touched. No packet
//! leaves those namespaces.
//!
//! The real VM boots the LB image from `KILN_TEST_LB_IMAGE` (an image
//! directory), or one built once from recipes/lb.toml (`KILN_CACHE` is
//! honoured, default target/kiln-cache).

mod common;

use kiln::deploy::env::model::Network;
use kiln::deploy::providers::local::{namespace, LocalProvider, BRIDGE};
use kiln::deploy::providers::{netns, NewVm, NodeVm, Provider};
use kiln::validate::keys::ThrowawayKey;
use kiln::validate::ssh::Guest;
use kiln::validate::Accel;
use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn require_root() {
    // SAFETY: geteuid(2) cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the local provider tests need root (network namespaces and tap devices): run them as root, as CI does"
    );
}

/// An environment name no other test (or test run) uses.
fn env_name(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

fn network() -> Network {
    Network {
        bridge: "vmbr0".into(),
        cidr: Ipv4Addr::new(10, 77, 0, 0),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 77, 0, 1),
        dns: vec![Ipv4Addr::new(10, 77, 0, 1)],
        vip: Ipv4Addr::new(10, 77, 0, 10),
    }
}

/// One test's environment: its state directory, and on drop the removal of
/// whatever is left of it (VMs first, then the namespace), pass or fail.
struct TestEnv {
    name: String,
    state: PathBuf,
    qemu: Option<PathBuf>,
}

impl TestEnv {
    fn new(tag: &str) -> TestEnv {
        require_root();
        let name = env_name(tag);
        let state = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("local-provider")
            .join(&name);
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        TestEnv {
            name,
            state,
            qemu: None,
        }
    }

    fn provider(&self) -> LocalProvider {
        let p = LocalProvider::new(&self.name, &network(), self.state.clone())
            .unwrap()
            .with_accel(Accel::Tcg);
        match &self.qemu {
            Some(q) => p.with_qemu(q.clone()),
            None => p,
        }
    }

    fn ns(&self) -> String {
        namespace(&self.name)
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state.join("local/vms").join(vm)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let p = self.provider();
        if let Ok(vms) = p.list() {
            for vm in vms {
                let _ = p.destroy(&vm);
            }
        }
        let _ = p.teardown();
        // Only a namespace named after this test process.
        let _ = netns::delete(&self.ns());
    }
}

fn ip_out(args: &[&str]) -> String {
    netns::ip(args).unwrap()
}

// ---------------------------------------------------------------------------
// The namespace and connections into it.

#[test]
fn prepare_makes_a_namespace_whose_bridge_holds_the_gateway_and_teardown_removes_it() {
    let env = TestEnv::new("net");
    let p = env.provider();
    p.prepare().unwrap();
    let ns = env.ns();
    assert!(netns::exists(&ns));
    let addr = ip_out(&["-n", &ns, "-o", "-4", "addr", "show", "dev", BRIDGE]);
    assert!(addr.contains("inet 10.77.0.1/24"), "{addr}");
    let lo = ip_out(&["-n", &ns, "-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    // Idempotent: a second prepare changes nothing and fails on nothing.
    p.prepare().unwrap();
    let again = ip_out(&["-n", &ns, "-o", "-4", "addr", "show", "dev", BRIDGE]);
    assert_eq!(again.matches("inet ").count(), 1, "{again}");
    // The host has no interface or address of the environment.
    let host = ip_out(&["-o", "-4", "addr"]);
    assert!(!host.contains("10.77.0.1/24"), "{host}");

    p.teardown().unwrap();
    assert!(!netns::exists(&ns));
    assert!(!env.state.join("local").exists());
}

#[test]
fn connect_reaches_a_listener_inside_the_namespace_that_the_host_cannot_reach() {
    let env = TestEnv::new("conn");
    let p = env.provider();
    p.prepare().unwrap();
    let ns = env.ns();
    // An extra address on the bridge, as an e2e test's stand-in server uses.
    let server = Ipv4Addr::new(10, 77, 0, 20);
    netns::add_address(&ns, BRIDGE, server, 24).unwrap();
    let listener = netns::listen(&ns, SocketAddr::from((server, 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"inside\n").unwrap();
        peer
    });

    let mut s = p
        .connect(SocketAddr::from((server, port)), Duration::from_secs(5))
        .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "inside\n");
    // The connection came from inside the namespace (the bridge's address).
    let peer = accepted.join().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)));

    // Nothing listens on the gateway: refused at once, inside the namespace.
    let e = p
        .connect(
            SocketAddr::from((network().gateway, port)),
            Duration::from_secs(5),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("refused"), "{e:#}");

    // The host network has no such address: it cannot be bound here, and the
    // host's own interfaces do not carry it (no packet is sent to find out).
    let e = std::net::TcpListener::bind((server, 0)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable, "{e}");
    assert!(!ip_out(&["-o", "-4", "addr"]).contains("10.77.0.20"));

    p.teardown().unwrap();
    assert!(!netns::exists(&ns));
    let e = p
        .connect(SocketAddr::from((server, port)), Duration::from_secs(1))
        .unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
}

#[test]
fn a_namespace_kiln_did_not_make_is_refused_and_left_alone() {
    let env = TestEnv::new("foreign");
    let ns = env.ns();
    netns::create(&ns).unwrap();
    let p = env.provider();
    let e = p.prepare().unwrap_err();
    assert!(
        format!("{e:#}").contains(&format!(
            "network namespace {ns} exists but kiln did not make it"
        )),
        "{e:#}"
    );
    p.teardown().unwrap();
    assert!(
        netns::exists(&ns),
        "teardown removed a namespace kiln did not make"
    );
    assert!(!netns::link_exists(&ns, BRIDGE));
    netns::delete(&ns).unwrap();
}

// ---------------------------------------------------------------------------
// The VM lifecycle, with a stand-in for QEMU.

/// A script standing in for `qemu-system-x86_64 -daemonize`: it notes its
/// arguments, its network namespace and the VM record as it found it, then
/// leaves a process behind (its command line carries all QEMU's arguments,
/// as a real QEMU's does) and writes that process's pid to the -pidfile.
const FAKE_QEMU: &str = r#"#!/bin/sh
arg_after() { want="$1"; shift; prev=""; for a in "$@"; do [ "$prev" = "$want" ] && echo "$a"; prev="$a"; done; }
if [ "$1" = "--linger" ]; then
    shift
    pidfile=$(arg_after -pidfile "$@")
    echo $$ > "$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
    while :; do sleep 1; done
fi
dir=$(dirname "$(arg_after -pidfile "$@")")
printf '%s\n' "$@" > "$dir/fake-args"
readlink /proc/self/ns/net > "$dir/fake-netns"
cp "$dir/vm.json" "$dir/fake-record-at-start.json"
setsid "$0" --linger "$@" </dev/null >/dev/null 2>&1 &
i=0
while [ ! -s "$(arg_after -pidfile "$@")" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -s "$(arg_after -pidfile "$@")" ]
"#;

/// A test environment whose QEMU is the stand-in, and a tiny base disk.
fn fake_env(tag: &str) -> (TestEnv, NewVm) {
    let mut env = TestEnv::new(tag);
    let fake = env.state.join("fake-qemu");
    std::fs::write(&fake, FAKE_QEMU).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.qemu = Some(fake);
    let image = env.state.join("image");
    std::fs::create_dir_all(&image).unwrap();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(image.join("base.qcow2"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let vm = new_vm(&env.name, &image, "base.qcow2", 64 << 20, Vec::new());
    (env, vm)
}

fn new_vm(env: &str, image: &Path, disk: &str, virtual_size: u64, keys: Vec<String>) -> NewVm {
    NewVm {
        env: env.to_string(),
        name: format!("{env}-lb-1-g0"),
        slot: "lb-1".into(),
        generation: 0,
        image_dir: image.to_path_buf(),
        image_id: "0".repeat(64),
        disk_file: disk.into(),
        disk_format: "qcow2".into(),
        disk_virtual_size: virtual_size,
        uefi: true,
        node: None,
        cores: 2,
        memory_mib: 1024,
        disk_bytes: virtual_size + (1 << 30),
        address: Ipv4Addr::new(10, 77, 0, 11),
        network: network(),
        user_data: "#cloud-config\n{}\n".into(),
        ssh_public_keys: keys,
        values_digest: "1".repeat(64),
    }
}

fn record(env: &TestEnv, vm: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(env.vm_dir(vm).join("vm.json")).unwrap()).unwrap()
}

fn pid_of(env: &TestEnv, vm: &str) -> i32 {
    record(env, vm)["pid"].as_i64().expect("a recorded pid") as i32
}

fn alive(pid: i32) -> bool {
    // A zombie (killed, not yet reaped by init) has an empty command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn kill_and_wait(pid: i32) {
    // SAFETY: kill(2) on the stand-in QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let until = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < until, "pid {pid} would not die");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn only(list: Vec<NodeVm>) -> NodeVm {
    assert_eq!(list.len(), 1, "{list:?}");
    list.into_iter().next().unwrap()
}

#[test]
fn create_starts_qemu_detached_inside_the_namespace_on_its_tap_with_a_static_address() {
    let (env, vm) = fake_env("create");
    let p = env.provider();
    let shown = p.create(&vm).unwrap();
    assert!(shown.running);
    assert_eq!(shown.name, vm.name);
    assert_eq!(shown.address, vm.address);
    assert_eq!(only(p.list().unwrap()), shown);

    let dir = env.vm_dir(&vm.name);
    // The record was on disk before QEMU started, without a pid.
    let at_start: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fake-record-at-start.json")).unwrap())
            .unwrap();
    assert_eq!(at_start["pid"], serde_json::Value::Null);
    assert_eq!(at_start["env"], env.name.as_str());
    let rec = record(&env, &vm.name);
    let mac = rec["mac"].as_str().unwrap().to_string();
    let tap = rec["tap"].as_str().unwrap().to_string();
    assert!(alive(pid_of(&env, &vm.name)));

    // QEMU ran inside the namespace.
    let ns_inode = std::fs::metadata(netns::path(&env.ns())).unwrap().ino();
    let seen = std::fs::read_to_string(dir.join("fake-netns")).unwrap();
    assert_eq!(seen.trim(), format!("net:[{ns_inode}]"));
    // On its tap, which is on the bridge, with its MAC; detached; sized as asked;
    // Secure Boot firmware as Proxmox boots it.
    let args = std::fs::read_to_string(dir.join("fake-args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    let joined = args.join(" ");
    assert!(
        joined.contains(&format!(
            "-netdev tap,id=n0,ifname={tap},script=no,downscript=no"
        )),
        "{joined}"
    );
    assert!(
        joined.contains(&format!("virtio-net-pci,netdev=n0,mac={mac}")),
        "{joined}"
    );
    assert!(joined.contains("-daemonize -pidfile"), "{joined}");
    assert!(joined.contains("-smp 2 "), "{joined}");
    assert!(joined.contains("-m 1024 "), "{joined}");
    assert!(joined.contains("-accel tcg"), "{joined}");
    assert!(
        joined.contains("driver=cfi.pflash01,property=secure,value=on"),
        "{joined}"
    );
    let link = ip_out(&["-n", &env.ns(), "-o", "link", "show", "dev", &tap]);
    assert!(link.contains(&format!("master {BRIDGE}")), "{link}");

    // The seed is an ISO on a CD-ROM, as a Proxmox VM carries it on ide2,
    // and gives the guest its static address by MAC.
    assert!(joined.contains("ide-cd,drive=seed"), "{joined}");
    let out = Command::new("isoinfo")
        .args(["-R", "-x", "/network-config", "-i"])
        .arg(dir.join("seed.iso"))
        .output()
        .expect("isoinfo (genisoimage) is installed");
    let nc = String::from_utf8_lossy(&out.stdout);
    assert!(nc.contains(&format!("macaddress: \"{mac}\"")), "{nc}");
    assert!(nc.contains("- \"10.77.0.11/24\""), "{nc}");
    assert!(nc.contains("via: \"10.77.0.1\""), "{nc}");
    // The overlay is as big as asked, over the image's disk.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(dir.join("disk.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], vm.disk_bytes);
    // The VM directory holds user-data: root's only.
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn a_create_interrupted_before_qemu_ran_is_still_listed_and_is_cleared_and_done_again() {
    let (env, vm) = fake_env("interrupted");
    let p = env.provider();
    p.create(&vm).unwrap();
    let dir = env.vm_dir(&vm.name);
    // Make it look as kiln leaves it when killed between writing the record
    // and starting QEMU: no pid anywhere, no QEMU.
    let first = pid_of(&env, &vm.name);
    kill_and_wait(first);
    let mut rec = record(&env, &vm.name);
    rec["pid"] = serde_json::Value::Null;
    std::fs::write(dir.join("vm.json"), rec.to_string()).unwrap();
    std::fs::remove_file(dir.join("qemu.pid")).unwrap();
    std::fs::write(dir.join("half-made"), "").unwrap();

    let listed = only(p.list().unwrap());
    assert_eq!(listed.name, vm.name);
    assert!(!listed.running);

    let again = p.create(&vm).unwrap();
    assert!(again.running);
    assert!(!dir.join("half-made").exists(), "the leftovers were kept");
    let second = pid_of(&env, &vm.name);
    assert_ne!(first, second);
    assert!(alive(second));
    assert!(only(p.list().unwrap()).running);
}

#[test]
fn create_returns_a_running_vm_as_it_is_and_starts_a_stopped_one_again_on_its_disk() {
    let (env, vm) = fake_env("again");
    let p = env.provider();
    p.create(&vm).unwrap();
    let dir = env.vm_dir(&vm.name);
    let first = pid_of(&env, &vm.name);

    let same = p.create(&vm).unwrap();
    assert!(same.running);
    assert_eq!(
        pid_of(&env, &vm.name),
        first,
        "a running VM was started again"
    );

    // The VM stopped after it was made (QEMU gone, pid recorded): its disk stays.
    kill_and_wait(first);
    std::fs::write(dir.join("written-by-the-guest"), "").unwrap();
    assert!(!only(p.list().unwrap()).running);
    let restarted = p.create(&vm).unwrap();
    assert!(restarted.running);
    let second = pid_of(&env, &vm.name);
    assert_ne!(first, second);
    assert!(alive(second));
    assert!(
        dir.join("written-by-the-guest").exists() && dir.join("disk.qcow2").exists(),
        "the stopped VM was made anew instead of started on its disk"
    );
}

#[test]
fn stop_and_destroy_leave_no_process_tap_or_directory_and_teardown_removes_the_namespace() {
    let (env, vm) = fake_env("destroy");
    let p = env.provider();
    let shown = p.create(&vm).unwrap();
    let pid = pid_of(&env, &vm.name);
    let tap = record(&env, &vm.name)["tap"].as_str().unwrap().to_string();

    let e = p.teardown().unwrap_err();
    assert!(format!("{e:#}").contains("still has local VMs"), "{e:#}");
    assert!(netns::exists(&env.ns()));

    // The stand-in has no QMP socket: the grace passes, then it is killed.
    p.stop(&shown, Duration::from_millis(500)).unwrap();
    assert!(!alive(pid));
    assert!(!only(p.list().unwrap()).running);
    p.stop(&shown, Duration::from_millis(500)).unwrap();

    p.destroy(&shown).unwrap();
    assert!(!env.vm_dir(&vm.name).exists());
    assert!(!netns::link_exists(&env.ns(), &tap));
    assert!(p.list().unwrap().is_empty());
    p.destroy(&shown).unwrap();

    p.teardown().unwrap();
    assert!(!netns::exists(&env.ns()));
}

#[test]
fn a_vm_of_another_environment_is_not_listed_and_not_touched() {
    let (env, vm) = fake_env("marks");
    let p = env.provider();
    p.create(&vm).unwrap();
    let dir = env.vm_dir(&vm.name);
    let mut rec = record(&env, &vm.name);
    rec["env"] = "someone-else".into();
    std::fs::write(dir.join("vm.json"), rec.to_string()).unwrap();
    assert!(p.list().unwrap().is_empty());
    let shown = vm.shown(vm.name.clone(), true);
    let e = p.destroy(&shown).unwrap_err();
    assert!(
        format!("{e:#}").contains("belongs to environment `someone-else`"),
        "{e:#}"
    );
    assert!(dir.exists());
    // Hand it back so the test's cleanup can remove it.
    rec["env"] = env.name.as_str().into();
    std::fs::write(dir.join("vm.json"), rec.to_string()).unwrap();
}

// ---------------------------------------------------------------------------
// One real VM.

fn lb_image() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TEST_LB_IMAGE") {
        return PathBuf::from(p);
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-test-lb-image");
    common::build_image(&common::repo(), "recipes/lb.toml", &out)
}

/// Run only as the child of the real-VM test: the kiln side that creates the
/// VM and is then SIGKILLed. Parameters come in the environment.
#[test]
#[ignore = "the kiln side of a_real_vm_…; runs only as its child"]
fn child_creates_the_vm_and_waits_to_be_killed() {
    let Some(state) = std::env::var_os("KILN_TEST_LOCAL_CHILD") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let env = var("KILN_TEST_LOCAL_ENV");
    let image = PathBuf::from(var("KILN_TEST_LOCAL_IMAGE"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let vm = new_vm(
        &env,
        &image,
        m["disk"]["file"].as_str().unwrap(),
        m["disk"]["virtual_size"].as_u64().unwrap(),
        vec![var("KILN_TEST_LOCAL_KEY")],
    );
    let p = LocalProvider::new(&env, &network(), PathBuf::from(state))
        .unwrap()
        .with_accel(Accel::Tcg);
    p.prepare().unwrap();
    let shown = p.create(&vm).unwrap();
    println!("CREATED {} running={}", shown.name, shown.running);
    std::thread::sleep(Duration::from_secs(3600));
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_vm_answers_ssh_at_its_static_address_in_the_namespace_and_outlives_kiln() {
    let env = TestEnv::new("vm");
    let image = lb_image();
    let key = ThrowawayKey::generate("kiln-local-test").unwrap();
    let name = format!("{}-lb-1-g0", env.name);
    let started = Instant::now();

    // The kiln side runs in a child process, which is SIGKILLed once the VM exists.
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "child_creates_the_vm_and_waits_to_be_killed",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KILN_TEST_LOCAL_CHILD", &env.state)
            .env("KILN_TEST_LOCAL_ENV", &env.name)
            .env("KILN_TEST_LOCAL_IMAGE", &image)
            .env("KILN_TEST_LOCAL_KEY", key.public_openssh())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    // libtest prints `test NAME ... ` before the test's own output, on the same line.
    let created = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.find("CREATED ").map(|i| l[i..].to_string()))
        .unwrap_or_else(|| panic!("the kiln side never created the VM"));
    assert_eq!(created, format!("CREATED {name} running=true"));
    let created_after = started.elapsed();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) };
    child.0.wait().unwrap();

    let p = env.provider();
    let vm = only(p.list().unwrap());
    assert!(vm.running, "QEMU died with the kiln side");
    let pid = pid_of(&env, &name);

    // SSH over a connection made inside the namespace, until the guest answers.
    let addr = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 11), 22));
    let deadline = Instant::now() + Duration::from_secs(900);
    let guest = loop {
        let attempt = p
            .connect(addr, Duration::from_secs(5))
            .and_then(|tcp| Guest::over(tcp, "debian", &key, Duration::from_secs(20)));
        let last = match attempt {
            Ok(g) => break g,
            Err(e) => format!("{e:#}"),
        };
        assert!(
            only(p.list().unwrap()).running,
            "the VM stopped while booting:\n{}",
            p.console_tail(&vm).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "no SSH at {addr} within 900 s (last: {last}); console:\n{}",
            p.console_tail(&vm).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let boot = started.elapsed();
    eprintln!(
        "local VM: created after {:.1} s, SSH answered after {:.1} s (TCG)",
        created_after.as_secs_f64(),
        boot.as_secs_f64()
    );
    let run = |cmd: &str| {
        let r = guest.run(cmd, Duration::from_secs(60), &|| false).unwrap();
        assert_eq!(r.exit, Some(0), "{cmd}: {}", r.stderr);
        r.stdout
    };
    assert_eq!(run("hostname").trim(), name);
    let a = run("ip -4 -o addr show dev eth0");
    assert!(a.contains("inet 10.77.0.11/24"), "{a}");
    let r = run("ip -4 route show default");
    assert!(r.contains("default via 10.77.0.1 dev eth0"), "{r}");
    drop(guest);
    assert!(p.console_tail(&vm).is_some_and(|t| !t.is_empty()));

    // A graceful stop powers the guest off; then nothing of it is left.
    let t = Instant::now();
    p.stop(&vm, Duration::from_secs(180)).unwrap();
    eprintln!("local VM: stopped in {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        t.elapsed() < Duration::from_secs(180),
        "the guest did not power off on the ACPI request; it was killed"
    );
    assert!(!alive(pid), "QEMU still runs after stop");
    assert!(!only(p.list().unwrap()).running);
    let tap = record(&env, &name)["tap"].as_str().unwrap().to_string();
    p.destroy(&vm).unwrap();
    assert!(!env.vm_dir(&name).exists());
    assert!(!netns::link_exists(&env.ns(), &tap));
    p.teardown().unwrap();
    assert!(!netns::exists(&env.ns()));
}
