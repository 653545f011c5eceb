//! Password files compatible with `mosquitto_passwd`, and `shardmq passwd`.
//!
//! Owns: reading a password file (`user:hash` lines), checking a password against an entry
//! in constant time, writing entries.
//! Never: keeps a password in clear once it is hashed, or accepts an entry whose parameters
//! would make one check take unbounded time or memory (a hostile file).
//!
//! Formats read, as `mosquitto_passwd` writes them (its `password_mosq.c`):
//! - `$6$SALT$HASH`: SHA-512 of the password then the salt (Mosquitto 1.x).
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512, a 64-byte key; salt and key in standard
//!   base64 with padding. Mosquitto 2.0 writes 101 iterations and a 12-byte salt, 2.1 writes
//!   1,000 iterations and a 64-byte salt.
//! - `$argon2id$v=19$m=M,t=T,p=P$SALT$HASH`: the PHC string of argon2id (Mosquitto 2.1 writes
//!   m=47104, t=1, p=1 with a 64-byte salt and key), salt and key in base64 without padding.
//!
//! Written by `shardmq passwd`: argon2id with Mosquitto 2.1's parameters (m=47104 KiB, t=1,
//! p=1), a 16-byte salt and a 32-byte key; with `--pbkdf2`, `$7$` with 1,000 iterations and a
//! 12-byte salt, which Mosquitto 2.0 (Debian's package) reads too.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// The largest password file read, in bytes.
pub const PASSWORD_FILE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The longest line of a password file, in bytes.
pub const PASSWORD_LINE_BYTES_MAX: usize = 4096;
/// PBKDF2 iterations accepted in an entry: one check stays within tens of milliseconds.
pub const PBKDF2_ITERATIONS_MAX: u32 = 1_000_000;
/// Argon2 memory accepted in an entry, in KiB (256 MiB).
pub const ARGON2_MEMORY_KIB_MAX: u32 = 256 * 1024;
/// Argon2 passes accepted in an entry.
pub const ARGON2_PASSES_MAX: u32 = 16;
/// Argon2 lanes accepted in an entry.
pub const ARGON2_LANES_MAX: u32 = 16;

/// PBKDF2 iterations `shardmq passwd --pbkdf2` writes (Mosquitto 2.1's default).
pub const PBKDF2_ITERATIONS_WRITTEN: u32 = 1000;
/// Argon2id memory `shardmq passwd` writes, in KiB (Mosquitto 2.1's).
pub const ARGON2_MEMORY_KIB_WRITTEN: u32 = 47_104;

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Argon2id {
        memory_kib: u32,
        passes: u32,
        lanes: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes stay out of logs.
        f.write_str(match self {
            Entry::Sha512 { .. } => "Entry::Sha512",
            Entry::Pbkdf2Sha512 { .. } => "Entry::Pbkdf2Sha512",
            Entry::Argon2id { .. } => "Entry::Argon2id",
        })
    }
}

impl Entry {
    /// Parses the hash part of a line (after `user:`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("$6$") {
            let (salt, hash) = rest
                .split_once('$')
                .ok_or("a `$6$` entry needs `$6$SALT$HASH`")?;
            let (salt, hash) = salt_and_hash(&STANDARD, (salt, 12, 64), (hash, 64, 64))?;
            return Ok(Entry::Sha512 { salt, hash });
        }
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a `$7$` entry needs `$7$ITERATIONS$SALT$HASH`".into());
            };
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| format!("iterations `{iterations}` is not a number"))?;
            if iterations == 0 || iterations > PBKDF2_ITERATIONS_MAX {
                return Err(format!(
                    "{iterations} iterations: 1 to {PBKDF2_ITERATIONS_MAX} are accepted"
                ));
            }
            let (salt, hash) = salt_and_hash(&STANDARD, (salt, 8, 128), (hash, 64, 64))?;
            return Ok(Entry::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            });
        }
        if let Some(rest) = text.strip_prefix("$argon2id$") {
            let mut parts = rest.split('$');
            let (Some("v=19"), Some(params), Some(salt), Some(hash), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(
                    "an argon2id entry needs `$argon2id$v=19$m=M,t=T,p=P$SALT$HASH`".into(),
                );
            };
            let (mut memory_kib, mut passes, mut lanes) = (None, None, None);
            for param in params.split(',') {
                let (name, value) = param
                    .split_once('=')
                    .ok_or_else(|| format!("argon2 parameter `{param}` is not NAME=VALUE"))?;
                let value: u32 = value
                    .parse()
                    .map_err(|_| format!("argon2 parameter `{param}` is not a number"))?;
                match name {
                    "m" => memory_kib = Some(value),
                    "t" => passes = Some(value),
                    "p" => lanes = Some(value),
                    _ => return Err(format!("unknown argon2 parameter `{name}`")),
                }
            }
            let (Some(memory_kib), Some(passes), Some(lanes)) = (memory_kib, passes, lanes) else {
                return Err("argon2 needs m, t and p".into());
            };
            if memory_kib > ARGON2_MEMORY_KIB_MAX
                || passes == 0
                || passes > ARGON2_PASSES_MAX
                || lanes == 0
                || lanes > ARGON2_LANES_MAX
                || memory_kib < 8 * lanes
            {
                return Err(format!(
                    "argon2 m={memory_kib},t={passes},p={lanes}: at most m={ARGON2_MEMORY_KIB_MAX}, t={ARGON2_PASSES_MAX}, p={ARGON2_LANES_MAX}, and m at least 8p"
                ));
            }
            let (salt, hash) = salt_and_hash(&STANDARD_NO_PAD, (salt, 8, 128), (hash, 16, 128))?;
            return Ok(Entry::Argon2id {
                memory_kib,
                passes,
                lanes,
                salt,
                hash,
            });
        }
        Err("unknown hash format (expected `$6$`, `$7$` or `$argon2id$`; plain passwords are refused)".into())
    }

    /// The hash part of a line.
    pub fn encode(&self) -> String {
        match self {
            Entry::Sha512 { salt, hash } => {
                format!("$6${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
            }
            Entry::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => format!(
                "$7${iterations}${}${}",
                STANDARD.encode(salt),
                STANDARD.encode(hash)
            ),
            Entry::Argon2id {
                memory_kib,
                passes,
                lanes,
                salt,
                hash,
            } => format!(
                "$argon2id$v=19$m={memory_kib},t={passes},p={lanes}${}${}",
                STANDARD_NO_PAD.encode(salt),
                STANDARD_NO_PAD.encode(hash)
            ),
        }
    }

    /// Whether `password` is this entry's, compared in constant time. Slow by design
    /// (milliseconds): never call it on a shard thread.
    // The verifier pool (`auth.rs`) calls it, on its own threads.
    pub fn verify(&self, password: &[u8]) -> bool {
        let computed = match self {
            Entry::Sha512 { salt, .. } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                digest.finalize().to_vec()
            }
            Entry::Pbkdf2Sha512 {
                iterations, salt, ..
            } => pbkdf2_sha512(password, salt, *iterations),
            Entry::Argon2id {
                memory_kib,
                passes,
                lanes,
                salt,
                hash,
            } => match argon2id(password, salt, *memory_kib, *passes, *lanes, hash.len()) {
                Some(key) => key,
                None => return false,
            },
        };
        let stored = match self {
            Entry::Sha512 { hash, .. }
            | Entry::Pbkdf2Sha512 { hash, .. }
            | Entry::Argon2id { hash, .. } => hash,
        };
        stored.len() == computed.len() && bool::from(stored.ct_eq(&computed))
    }

    /// A new argon2id entry for `password` (Mosquitto 2.1's parameters).
    pub fn new_argon2id(password: &[u8]) -> Result<Self, String> {
        let salt = random_bytes(16)?;
        let (memory_kib, passes, lanes) = (ARGON2_MEMORY_KIB_WRITTEN, 1, 1);
        let hash =
            argon2id(password, &salt, memory_kib, passes, lanes, 32).ok_or("argon2id failed")?;
        Ok(Entry::Argon2id {
            memory_kib,
            passes,
            lanes,
            salt,
            hash,
        })
    }

    /// A new `$7$` entry for `password`, readable by Mosquitto 2.0 too.
    pub fn new_pbkdf2(password: &[u8]) -> Result<Self, String> {
        let salt = random_bytes(12)?;
        let iterations = PBKDF2_ITERATIONS_WRITTEN;
        Ok(Entry::Pbkdf2Sha512 {
            iterations,
            hash: pbkdf2_sha512(password, &salt, iterations),
            salt,
        })
    }
}

/// A salt and a hash in base64, each as (text, shortest, longest in bytes).
fn salt_and_hash(
    engine: &base64::engine::GeneralPurpose,
    salt: (&str, usize, usize),
    hash: (&str, usize, usize),
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let decode = |(text, min, max): (&str, usize, usize), what: &str| {
        let bytes = engine
            .decode(text)
            .map_err(|e| format!("the {what} is not valid base64: {e}"))?;
        if (min..=max).contains(&bytes.len()) {
            Ok(bytes)
        } else {
            Err(format!(
                "a {what} of {} bytes ({min} to {max} are accepted)",
                bytes.len()
            ))
        }
    };
    Ok((decode(salt, "salt")?, decode(hash, "hash")?))
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut key = vec![0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut key);
    key
}

fn argon2id(
    password: &[u8],
    salt: &[u8],
    memory_kib: u32,
    passes: u32,
    lanes: u32,
    len: usize,
) -> Option<Vec<u8>> {
    let params = argon2::Params::new(memory_kib, passes, lanes, Some(len)).ok()?;
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = vec![0u8; len];
    hasher.hash_password_into(password, salt, &mut key).ok()?;
    Some(key)
}

fn random_bytes(count: usize) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; count];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no randomness for a salt: {e}"))?;
    Ok(bytes)
}

/// A parsed password file: users in name order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PasswordFile {
    pub entries: BTreeMap<String, Entry>,
}

impl PasswordFile {
    /// Parses a file's bytes; an error names its line.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > PASSWORD_FILE_BYTES_MAX {
            return Err(format!(
                "{} bytes, more than the {PASSWORD_FILE_BYTES_MAX} accepted",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let mut file = PasswordFile::default();
        for (number, line) in text.lines().enumerate() {
            let number = number + 1;
            if line.len() > PASSWORD_LINE_BYTES_MAX {
                return Err(format!(
                    "line {number}: longer than {PASSWORD_LINE_BYTES_MAX} bytes"
                ));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {number}: expected `user:hash`"))?;
            if user.is_empty() {
                return Err(format!("line {number}: an empty user name"));
            }
            let entry = Entry::parse(hash).map_err(|e| {
                format!(
                    "line {number} (user {}): {e}",
                    shardmq_shards::limits::quote(user)
                )
            })?;
            if file.entries.insert(user.to_string(), entry).is_some() {
                return Err(format!(
                    "line {number}: user {} appears twice",
                    shardmq_shards::limits::quote(user)
                ));
            }
        }
        Ok(file)
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        for (user, entry) in &self.entries {
            text.push_str(user);
            text.push(':');
            text.push_str(&entry.encode());
            text.push('\n');
        }
        text
    }
}

/// What `shardmq passwd` was asked.
#[derive(Debug)]
pub struct PasswdCommand<'a> {
    pub file: &'a Path,
    pub user: &'a str,
    /// `-b`: the password from the command line; else asked on the terminal.
    pub password: Option<&'a str>,
    /// `-c`: create the file (replacing one that exists).
    pub create: bool,
    /// `-D`: delete the user.
    pub delete: bool,
    /// `--pbkdf2`: write `$7$` instead of argon2id.
    pub pbkdf2: bool,
}

/// Adds, changes or deletes one user of a password file, written atomically with mode 0600.
pub fn run(command: &PasswdCommand<'_>) -> Result<String, String> {
    let user = command.user;
    if user.is_empty() || user.contains(':') || user.contains('\n') {
        return Err("a user name must be non-empty and contain no `:` or newline".into());
    }
    let mut file = if command.create {
        PasswordFile::default()
    } else {
        let bytes = std::fs::read(command.file)
            .map_err(|e| format!("{}: {e} (use -c to create it)", command.file.display()))?;
        PasswordFile::parse(&bytes).map_err(|e| format!("{}: {e}", command.file.display()))?
    };
    let message = if command.delete {
        if file.entries.remove(user).is_none() {
            return Err(format!("user {user} is not in {}", command.file.display()));
        }
        format!("deleted {user}")
    } else {
        let password = match command.password {
            Some(password) => password.to_string(),
            None => {
                let first = rpassword::prompt_password("Password: ")
                    .map_err(|e| format!("cannot read the password: {e}"))?;
                let again = rpassword::prompt_password("Reenter password: ")
                    .map_err(|e| format!("cannot read the password: {e}"))?;
                if first != again {
                    return Err("the passwords do not match".into());
                }
                first
            }
        };
        let entry = if command.pbkdf2 {
            Entry::new_pbkdf2(password.as_bytes())?
        } else {
            Entry::new_argon2id(password.as_bytes())?
        };
        let changed = file.entries.insert(user.to_string(), entry).is_some();
        format!("{} {user}", if changed { "changed" } else { "added" })
    };
    write_private(command.file, file.encode().as_bytes())
        .map_err(|e| format!("{}: {e}", command.file.display()))?;
    Ok(message)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    // A fresh name, created exclusively (O_CREAT | O_EXCL also refuses a symbolic link in its
    // place): in a directory others may write to, a planted `NAME.tmp` must not redirect the
    // write.
    let mut nonce = [0u8; 8];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut temporary_name = name.to_os_string();
    temporary_name.push(format!(".{:016x}.tmp", u64::from_le_bytes(nonce)));
    let temporary = directory.map_or_else(
        || Path::new(&temporary_name).to_path_buf(),
        |d| d.join(&temporary_name),
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    // The rename is durable only once the directory is.
    std::fs::File::open(directory.unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `$7$` entry built the way Mosquitto 2.0 writes one (12-byte salt, 101 iterations);
    /// `tests/auth_passwd.rs` reads entries written by the real `mosquitto_passwd`.
    fn pbkdf2_line(password: &str) -> String {
        let salt = b"0123456789ab";
        let mut key = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, 101, &mut key);
        format!("$7$101${}${}", STANDARD.encode(salt), STANDARD.encode(key))
    }

    #[test]
    fn each_format_round_trips_and_verifies() {
        for entry in [
            Entry::new_pbkdf2(b"secret").unwrap(),
            Entry::new_argon2id(b"secret").unwrap(),
            Entry::parse(&pbkdf2_line("secret")).unwrap(),
        ] {
            let again = Entry::parse(&entry.encode()).unwrap();
            assert_eq!(again, entry);
            assert!(again.verify(b"secret"));
            assert!(!again.verify(b"Secret"));
            assert!(!again.verify(b""));
        }
        let salt = b"saltsaltsalt";
        let mut digest = Sha512::new();
        digest.update(b"pw");
        digest.update(salt);
        let line = format!(
            "$6${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(digest.finalize())
        );
        let entry = Entry::parse(&line).unwrap();
        assert!(entry.verify(b"pw") && !entry.verify(b"px"));
    }

    #[test]
    fn argon2id_reads_a_reference_phc_string() {
        // Written by the reference implementation (Debian's `argon2`): `echo -n password |
        // argon2 somesalt -id -t 2 -m 16 -p 1 -l 32 -e`.
        let phc = "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc";
        let entry = Entry::parse(phc).unwrap();
        assert!(entry.verify(b"password"));
        assert!(!entry.verify(b"passwore"));
    }

    #[test]
    fn reads_an_entry_written_by_mosquitto_passwd() {
        // `mosquitto_passwd -c -b FILE alice secret`, Mosquitto 2.0.11 (Debian 12).
        let line = "$7$101$jnE0o6k0TO2Qd+BO$J/XWMvbAQJ82Q/2vy8ORMwBEkAslWw/b3ELsJ8Nz3kHYame8vUaStEmKcK9DoIcRpStHVcc7bO2/xU7wU7L6EA==";
        let entry = Entry::parse(line).unwrap();
        assert!(entry.verify(b"secret"));
        assert!(!entry.verify(b"secreT"));
        assert_eq!(entry.encode(), line);
    }

    #[test]
    fn hostile_entries_are_refused() {
        let long_salt = STANDARD.encode([0u8; 200]);
        for bad in [
            "plain",
            "$7$0$AAAAAAAAAAAAAAAA$AAAA",
            "$7$99999999999$AAAAAAAAAAAA$AAAA",
            "$7$101$!!!$AAAA",
            &format!("$7$101${long_salt}${}", STANDARD.encode([0u8; 64])),
            "$7$101$AAAAAAAAAAAAAAAA$AAAA",
            "$argon2id$v=19$m=99999999,t=1,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=65536,t=1000,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=16$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2i$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$6$AAAA$AAAA",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_parse_with_line_numbers() {
        let text = format!("# comment\n\nalice:{}\nbob:plain\n", pbkdf2_line("a"));
        let error = PasswordFile::parse(text.as_bytes()).unwrap_err();
        assert!(error.starts_with("line 4 (user bob)"), "{error}");
        let text = format!("alice:{0}\nalice:{0}\n", pbkdf2_line("a"));
        assert!(
            PasswordFile::parse(text.as_bytes())
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            PasswordFile::parse(b"nocolon\n")
                .unwrap_err()
                .contains("line 1")
        );
        let long = format!("u:{}\n", "x".repeat(PASSWORD_LINE_BYTES_MAX));
        assert!(PasswordFile::parse(long.as_bytes()).is_err());
        let text = format!("alice:{}\n", pbkdf2_line("a"));
        let file = PasswordFile::parse(text.as_bytes()).unwrap();
        assert!(file.entries["alice"].verify(b"a"));
        assert_eq!(file.encode(), text);
    }
}
