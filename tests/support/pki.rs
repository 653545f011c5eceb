//! Certificates for the TLS tests, made by `openssl` in a folder of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn openssl(directory: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(directory)
        .output()
        .expect("openssl is installed (Debian: apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A folder of PEM files made by `openssl`.
pub struct Pki {
    pub directory: PathBuf,
}

impl Pki {
    /// An empty folder for `test` (`kind` keeps tests of different binaries apart).
    pub fn new_in(kind: &str, test: &str) -> Self {
        let directory =
            std::env::temp_dir().join(format!("shardmq-{kind}-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        Self { directory }
    }

    /// A folder with authority `ca` and a server certificate `server` (CN server-a, for
    /// 127.0.0.1 and localhost) signed by it.
    pub fn with_server(kind: &str, test: &str) -> Self {
        let pki = Self::new_in(kind, test);
        pki.authority("ca");
        pki.certificate(
            "server",
            "server-a",
            "IP:127.0.0.1,DNS:localhost",
            "serverAuth",
            "ca",
        );
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.directory.join(file).display().to_string()
    }

    /// A self-signed authority `name` (`name.pem`, `name.key`).
    pub fn authority(&self, name: &str) {
        openssl(
            &self.directory,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// A certificate `name` with subject CN `cn` and subjectAltName `san`, signed by
    /// `authority`, for a server or a client (`usage`: serverAuth or clientAuth).
    pub fn certificate(&self, name: &str, cn: &str, san: &str, usage: &str, authority: &str) {
        openssl(
            &self.directory,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(
            self.directory.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            ),
        )
        .unwrap();
        openssl(
            &self.directory,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-days",
                "2",
                "-CA",
                &format!("{authority}.pem"),
                "-CAkey",
                &format!("{authority}.key"),
                "-CAcreateserial",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}
