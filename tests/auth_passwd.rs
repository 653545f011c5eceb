//! `shardmq passwd` and password files shared with Mosquitto: a file written by the real
//! `mosquitto_passwd` is read and kept, and the `$7$` entries `shardmq passwd --pbkdf2`
//! writes are accepted by a real Mosquitto broker (Debian's `mosquitto`, which the test
//! command installs; a missing tool fails the test).

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shardmq_passwd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .arg("passwd")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("shardmq runs")
}

fn mosquitto_pub(port: u16, user: &str, password: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(["-u", user, "-P", password, "-t", "t", "-m", "m"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub is installed")
        .success()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("the password file")
}

#[test]
fn a_file_shared_with_mosquitto_passwd_and_a_real_mosquitto() {
    let directory =
        std::env::temp_dir().join(format!("shardmq-auth-passwd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let file = directory.join("passwords");
    let file_arg = file.to_str().unwrap();
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b", file_arg, "alice", "secret"])
        .status()
        .expect("mosquitto_passwd is installed (the test command installs mosquitto)");
    assert!(status.success());
    let alice_line = read(&file).lines().next().unwrap().to_string();
    assert!(alice_line.starts_with("alice:$7$"), "{alice_line}");

    let added = shardmq_passwd(&["-b", "--pbkdf2", file_arg, "bob", "hunter2"]);
    assert!(added.status.success(), "{added:?}");
    let added = shardmq_passwd(&["-b", file_arg, "carol", "pw"]);
    assert!(added.status.success(), "{added:?}");
    let text = read(&file);
    assert!(
        text.contains(&alice_line),
        "alice's entry is kept as written:\n{text}"
    );
    assert!(text.contains("bob:$7$1000$"), "{text}");
    assert!(
        text.contains("carol:$argon2id$v=19$m=47104,t=1,p=1$"),
        "{text}"
    );
    let deleted = shardmq_passwd(&["-D", file_arg, "carol"]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!read(&file).contains("carol:"));
    let missing = shardmq_passwd(&["-D", file_arg, "carol"]);
    assert!(!missing.status.success());
    let without_b = shardmq_passwd(&[file_arg, "dave", "pw"]);
    assert!(!without_b.status.success(), "a password argument needs -b");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Mosquitto 2.0 reads what shardmq wrote (argon2id needs Mosquitto 2.1, so only the
    // `$7$` users are in its file).
    let mosquitto_file = directory.join("mosquitto-passwords");
    let shared: String = read(&file)
        .lines()
        .filter(|line| line.contains("$7$"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&mosquitto_file, shared).unwrap();
    let port = support::free_port();
    let config = directory.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            mosquitto_file.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new("mosquitto")
        .args(["-c", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is installed (the test command installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes = (
        mosquitto_pub(port, "bob", "hunter2"),
        mosquitto_pub(port, "alice", "secret"),
        mosquitto_pub(port, "bob", "wrong"),
    );
    let _ = broker.kill();
    let _ = broker.wait();
    assert_eq!(
        outcomes,
        (true, true, false),
        "bob, alice, bob with a wrong password"
    );

    // A damaged file is refused with its line, and left as it was.
    std::fs::write(&file, format!("{alice_line}\nmallory:plaintext\n")).unwrap();
    let refused = shardmq_passwd(&["-b", file_arg, "erin", "pw"]);
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("line 2"), "{error}");
    assert!(read(&file).contains("mallory:plaintext"));
    let _ = std::fs::remove_dir_all(&directory);
}
