//! Authentication off the data plane: the `[auth]` files, the verifier pool, the credential
//! cache, and their reload.
//!
//! Owns: reading `password_file`, `acl_file` and `jwt_key_file` (at start and on reload),
//! the shards' [`Policy`] built from them, the threads that check passwords and tokens, and
//! the cache of credentials verified lately.
//! How: a shard that needs a CONNECT's credentials checked emits `NodeOutput::Verify`; its
//! handler asks [`Auth::submit`], which answers at once from the cache (on the shard's thread:
//! one HMAC and a map lookup under a short lock), or queues the check for the pool, or, with
//! the queue at `verifier_queue_max`, answers `Unavailable` (CONNACK 0x88). A pool thread
//! checks (a PBKDF2 or argon2 hash: milliseconds; a JWT signature: tens of microseconds) and
//! posts the verdict to the shard's mailbox (`NodeMessage::Verified`). Tokens go through the
//! pool too, though they are fast: RS256 and ES256 checks cost tens to hundreds of
//! microseconds, as much as hundreds of packets, and one path keeps a shard's latency the
//! same whatever the method.
//! Never: keeps a password in the cache in clear (the key is an HMAC-SHA256 of the username
//! and password under a key drawn at start), or runs a hash on a shard's thread.
//! Invariants: a reload swaps the checker and the policies whole, or nothing when a file is
//! bad; a check that started before a reload does not fill the cache after it (generations).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};

use bytestring::ByteString;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use shardmq_net::reactor::Mailboxes;
use shardmq_shards::auth::{Acl, Credentials, Policy, Principal, Verdict};
use shardmq_shards::limits::quote;
use tracing::{info, warn};

use crate::admin::NodeMessage;
use crate::config::AuthConfig;
use crate::passwd::{Entry, PasswordFile};

/// The shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash's size).
const HS256_SECRET_BYTES_MIN: usize = 32;
/// The largest key file read, in bytes.
const KEY_FILE_BYTES_MAX: usize = 64 * 1024;
/// The most filters a token's ACL claim may list.
const CLAIM_FILTERS_MAX: usize = 256;

/// What the `[auth]` files said, checked: the shards' policy and the pool's checker.
struct Loaded {
    policy: Arc<Policy>,
    checker: Arc<Checker>,
}

/// Verified credentials by their HMAC key, at most `max` of them: when full, the oldest
/// entry makes room (constant time: the insertion order is kept beside the map).
#[derive(Default)]
struct CredentialCache {
    entries: HashMap<[u8; 32], Principal>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl CredentialCache {
    fn get(&self, key: &[u8; 32]) -> Option<&Principal> {
        self.entries.get(key)
    }

    fn insert(&mut self, key: [u8; 32], principal: Principal, max: usize) {
        if self.entries.insert(key, principal).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.entries.len() > max {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Checks credentials against the password file and the JWT key.
struct Checker {
    passwords: Option<PasswordFile>,
    jwt: Option<Jwt>,
    /// The file's costliest entry: checked (and its answer ignored) for a username the file
    /// does not hold, so that a refusal takes as long whether or not the user exists.
    decoy: Option<crate::passwd::Entry>,
}

/// How long an entry takes to check, to pick the decoy: argon2id above PBKDF2 above SHA-512,
/// then by its parameters.
fn cost(entry: &crate::passwd::Entry) -> (u8, u64) {
    use crate::passwd::Entry;
    match entry {
        Entry::Sha512 { .. } => (0, 0),
        Entry::Pbkdf2Sha512 { iterations, .. } => (1, u64::from(*iterations)),
        Entry::Argon2id {
            memory_kib, passes, ..
        } => (2, u64::from(*memory_kib) * u64::from(*passes)),
    }
}

struct Jwt {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
    username_claim: String,
    acl_claim: Option<String>,
}

/// One check for the pool.
struct Job {
    shard: u16,
    connection: u64,
    ticket: u64,
    credentials: Credentials,
}

/// What `submit` did with a check.
#[derive(Debug)]
pub enum Submitted {
    /// The pool has it: the verdict comes through the shard's mailbox.
    Queued,
    /// Answered now (from the cache, or refused: the queue is full).
    Answered(Verdict),
}

/// Summary of a load, for the log and the admin API.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub users: usize,
    pub acl_rules: usize,
    pub jwt: bool,
    pub allow_anonymous: bool,
}

/// The `[auth]` state shared by the shards' handlers, the pool, SIGHUP and the admin API.
pub struct Auth {
    config: AuthConfig,
    checker: RwLock<Arc<Checker>>,
    policy: RwLock<Arc<Policy>>,
    queue: SyncSender<Job>,
    cache: Mutex<CredentialCache>,
    cache_key: [u8; 32],
    /// Bumped by each reload: a check of an older generation does not fill the cache.
    generation: AtomicU64,
    /// One reload at a time, so that two in a race reach the shards in the order built.
    reloading: Mutex<()>,
    mailboxes: Arc<Mailboxes<NodeMessage>>,
    shard_count: u16,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &str, key: &str, max: usize) -> Result<Vec<u8>, String> {
    let source = format!("`auth.{key}` ({path})");
    let metadata = std::fs::metadata(path).map_err(|e| format!("{source}: {e}"))?;
    if metadata.len() > max as u64 {
        return Err(format!(
            "{source}: {} bytes, more than the {max} accepted",
            metadata.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{source}: {e}"))
}

/// Refuses entries costlier than the configured caps.
fn check_costs(file: &PasswordFile, config: &AuthConfig) -> Result<(), String> {
    for (user, entry) in &file.entries {
        match entry {
            Entry::Pbkdf2Sha512 { iterations, .. }
                if *iterations > config.pbkdf2_iterations_max =>
            {
                return Err(format!(
                    "user {}: {iterations} PBKDF2 iterations, more than `auth.pbkdf2_iterations_max` ({})",
                    quote(user),
                    config.pbkdf2_iterations_max
                ));
            }
            Entry::Argon2id { memory_kib, .. } if *memory_kib > config.argon2_memory_kib_max => {
                return Err(format!(
                    "user {}: argon2 memory of {memory_kib} KiB, more than `auth.argon2_memory_kib_max` ({})",
                    quote(user),
                    config.argon2_memory_kib_max
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn load_jwt(config: &AuthConfig) -> Result<Option<Jwt>, String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    if config.jwt_key_file.is_empty() {
        return Ok(None);
    }
    let bytes = read_file(&config.jwt_key_file, "jwt_key_file", KEY_FILE_BYTES_MAX)?;
    let source = format!("`auth.jwt_key_file` ({})", config.jwt_key_file);
    let (algorithm, key) = match config.jwt_algorithm.as_str() {
        "HS256" => {
            // A file's final newline is not part of the secret.
            let secret = bytes.trim_ascii_end();
            if secret.len() < HS256_SECRET_BYTES_MIN {
                return Err(format!(
                    "{source}: an HS256 secret of {} bytes; at least {HS256_SECRET_BYTES_MIN} are required",
                    secret.len()
                ));
            }
            (Algorithm::HS256, DecodingKey::from_secret(secret))
        }
        "RS256" => (
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(&bytes)
                .map_err(|e| format!("{source}: not a PEM RSA public key: {e}"))?,
        ),
        "ES256" => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&bytes)
                .map_err(|e| format!("{source}: not a PEM EC (P-256) public key: {e}"))?,
        ),
        other => return Err(format!("`auth.jwt_algorithm`: unknown algorithm {other:?}")),
    };
    let mut validation = Validation::new(algorithm);
    let mut required = vec!["exp"];
    validation.validate_exp = true;
    validation.validate_nbf = true;
    if config.jwt_issuer.is_empty() {
        validation.iss = None;
    } else {
        validation.set_issuer(&[config.jwt_issuer.as_str()]);
        required.push("iss");
    }
    if config.jwt_audience.is_empty() {
        // No audience is configured: a token's `aud` is not checked.
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[config.jwt_audience.as_str()]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    Ok(Some(Jwt {
        key,
        validation,
        username_claim: config.jwt_username_claim.clone(),
        acl_claim: (!config.jwt_acl_claim.is_empty()).then(|| config.jwt_acl_claim.clone()),
    }))
}

/// Reads and checks every file `[auth]` names.
fn load(config: &AuthConfig) -> Result<Loaded, String> {
    let passwords = if config.password_file.is_empty() {
        None
    } else {
        let bytes = read_file(
            &config.password_file,
            "password_file",
            crate::passwd::PASSWORD_FILE_BYTES_MAX,
        )?;
        let file = PasswordFile::parse(&bytes)
            .and_then(|file| check_costs(&file, config).map(|()| file))
            .map_err(|e| format!("`auth.password_file` ({}): {e}", config.password_file))?;
        Some(file)
    };
    let acl = if config.acl_file.is_empty() {
        None
    } else {
        let bytes = read_file(
            &config.acl_file,
            "acl_file",
            shardmq_shards::auth::acl::ACL_FILE_BYTES_MAX,
        )?;
        Some(
            Acl::parse(&bytes)
                .map_err(|e| format!("`auth.acl_file` ({}): {e}", config.acl_file))?,
        )
    };
    let jwt = load_jwt(config)?;
    let policy = Policy {
        allow_anonymous: config.anonymous_allowed()?,
        verify: passwords.is_some() || jwt.is_some(),
        acl,
    };
    Ok(Loaded {
        policy: Arc::new(policy),
        checker: Arc::new(Checker {
            decoy: passwords.as_ref().and_then(|file| {
                file.entries
                    .values()
                    .max_by_key(|entry| cost(entry))
                    .cloned()
            }),
            passwords,
            jwt,
        }),
    })
}

impl Loaded {
    fn summary(&self) -> Summary {
        Summary {
            users: self
                .checker
                .passwords
                .as_ref()
                .map_or(0, |file| file.entries.len()),
            acl_rules: self.policy.acl.as_ref().map_or(0, Acl::rule_count),
            jwt: self.checker.jwt.is_some(),
            allow_anonymous: self.policy.allow_anonymous,
        }
    }
}

impl Checker {
    /// The verdict on one CONNECT's credentials, and whether it may be cached (a password
    /// entry's only: a token's `exp` must be checked at every CONNECT). Slow by design for
    /// password entries.
    fn check(&self, credentials: &Credentials) -> (Verdict, bool) {
        let password = credentials.password.as_deref();
        if let (Some(passwords), Some(user)) = (&self.passwords, &credentials.username)
            && let Some(entry) = passwords.entries.get(&**user)
        {
            return match password {
                Some(password) if entry.verify(password) => (
                    Verdict::Accepted(Principal {
                        username: Some(ByteString::from(&**user)),
                        claims: None,
                    }),
                    true,
                ),
                _ => (Verdict::BadCredentials, false),
            };
        }
        if let (Some(jwt), Some(password)) = (&self.jwt, password) {
            let verdict = jwt.check(password);
            if matches!(verdict, Verdict::Accepted(_)) {
                return (verdict, false);
            }
        }
        // A user the file does not hold costs a hash too (the answer is thrown away).
        if let Some(decoy) = &self.decoy {
            let _ = decoy.verify(password.unwrap_or_default());
        }
        (Verdict::BadCredentials, false)
    }
}

impl Jwt {
    fn check(&self, token: &[u8]) -> Verdict {
        let Ok(token) = std::str::from_utf8(token) else {
            return Verdict::BadCredentials;
        };
        let claims = match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &self.key,
            &self.validation,
        ) {
            Ok(data) => data.claims,
            Err(error) => {
                info!(%error, "a JWT was refused");
                return Verdict::BadCredentials;
            }
        };
        let Some(Value::String(username)) = claims.get(&self.username_claim) else {
            info!(
                claim = self.username_claim,
                "a JWT without its username claim (a string) was refused"
            );
            return Verdict::BadCredentials;
        };
        let claims_acl = match &self.acl_claim {
            None => None,
            Some(name) => match claims.get(name).map(claim_acl) {
                Some(Ok(acl)) => Some(Arc::new(acl)),
                Some(Err(error)) => {
                    info!(claim = name, %error, "a JWT with a malformed ACL claim was refused");
                    return Verdict::BadCredentials;
                }
                // A token without the claim may do nothing the claim would grant.
                None => Some(Arc::new(Acl::default())),
            },
        };
        Verdict::Accepted(Principal {
            username: Some(ByteString::from(username.as_str())),
            claims: claims_acl,
        })
    }
}

/// A token's ACL claim, `{"publish": [FILTER...], "subscribe": [FILTER...]}`, compiled as
/// `pattern` rules (so `%c` and `%u` levels work as in the file).
fn claim_acl(claim: &Value) -> Result<Acl, String> {
    let Value::Object(claim) = claim else {
        return Err("not an object".into());
    };
    let mut text = String::new();
    let mut count = 0;
    for (key, access) in [("publish", "write"), ("subscribe", "read")] {
        let Some(filters) = claim.get(key) else {
            continue;
        };
        let Value::Array(filters) = filters else {
            return Err(format!("`{key}` is not an array"));
        };
        for filter in filters {
            let Value::String(filter) = filter else {
                return Err(format!("`{key}` holds something other than a string"));
            };
            count += 1;
            if count > CLAIM_FILTERS_MAX {
                return Err(format!("more than {CLAIM_FILTERS_MAX} filters"));
            }
            if filter.is_empty() || filter.chars().any(char::is_control) {
                return Err(format!("a bad filter {}", quote(filter)));
            }
            text.push_str("pattern ");
            text.push_str(access);
            text.push(' ');
            text.push_str(filter);
            text.push('\n');
        }
    }
    Acl::parse(text.as_bytes()).map_err(|e| e.to_string())
}

impl Auth {
    /// Reads the files and starts the pool. An error names the key and the file.
    pub fn start(
        config: &AuthConfig,
        mailboxes: Arc<Mailboxes<NodeMessage>>,
        shard_count: u16,
    ) -> Result<(Arc<Self>, Summary), String> {
        let loaded = load(config)?;
        let summary = loaded.summary();
        let (queue, jobs) = std::sync::mpsc::sync_channel(config.verifier_queue_max);
        let mut cache_key = [0u8; 32];
        getrandom::getrandom(&mut cache_key)
            .map_err(|e| format!("no randomness for the credential cache key: {e}"))?;
        let auth = Arc::new(Self {
            config: config.clone(),
            checker: RwLock::new(loaded.checker),
            policy: RwLock::new(loaded.policy),
            queue,
            cache: Mutex::new(CredentialCache::default()),
            cache_key,
            generation: AtomicU64::new(0),
            reloading: Mutex::new(()),
            mailboxes,
            shard_count,
        });
        let jobs = Arc::new(Mutex::new(jobs));
        for number in 0..config.verifier_threads {
            let (auth, jobs) = (Arc::downgrade(&auth), jobs.clone());
            std::thread::Builder::new()
                .name(format!("verifier-{number}"))
                .spawn(move || verifier_thread(&auth, &jobs))
                .map_err(|e| format!("cannot start verifier thread {number}: {e}"))?;
        }
        Ok((auth, summary))
    }

    /// The policy the shards apply now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks for a check of `credentials` for `connection` on `shard` (on the shard's
    /// thread: never blocks on a hash).
    pub fn submit(
        &self,
        shard: u16,
        connection: u64,
        ticket: u64,
        credentials: Credentials,
    ) -> Submitted {
        if let Some(principal) = self.cached(&credentials) {
            return Submitted::Answered(Verdict::Accepted(principal));
        }
        let job = Job {
            shard,
            connection,
            ticket,
            credentials,
        };
        match self.queue.try_send(job) {
            Ok(()) => Submitted::Queued,
            Err(TrySendError::Full(_)) => {
                warn!(
                    limit = self.config.verifier_queue_max,
                    "a CONNECT refused (server unavailable): the verifier queue is full"
                );
                Submitted::Answered(Verdict::Unavailable)
            }
            Err(TrySendError::Disconnected(_)) => Submitted::Answered(Verdict::Unavailable),
        }
    }

    /// The cache key of a username and password: HMAC-SHA256 under the process's key, of
    /// the username's length, the username and the password.
    fn cache_key(&self, credentials: &Credentials) -> Option<[u8; 32]> {
        let username = credentials.username.as_deref()?;
        let password = credentials.password.as_deref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.cache_key).ok()?;
        mac.update(&(username.len() as u64).to_be_bytes());
        mac.update(username.as_bytes());
        mac.update(password);
        Some(mac.finalize().into_bytes().into())
    }

    fn cached(&self, credentials: &Credentials) -> Option<Principal> {
        if self.config.credential_cache_max == 0 {
            return None;
        }
        let key = self.cache_key(credentials)?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    /// Remembers a password check that passed (the caller never gives a token's verdict:
    /// its `exp` must be checked each time), unless a reload came since it started.
    fn remember(&self, credentials: &Credentials, principal: &Principal, generation: u64) {
        let max = self.config.credential_cache_max;
        if max == 0 {
            return;
        }
        let Some(key) = self.cache_key(credentials) else {
            return;
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        cache.insert(key, principal.clone(), max);
    }

    /// Reads the files again; if all are good, the pool and every shard use them from now
    /// on (connected clients stay), and the cache is emptied. On an error nothing changes.
    pub fn reload(&self, asked_by: &str) -> Result<Summary, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = match load(&self.config) {
            Ok(loaded) => loaded,
            Err(error) => {
                warn!(%error, asked_by, "auth reload failed: the rules in force stay");
                return Err(error);
            }
        };
        let summary = loaded.summary();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            self.generation.fetch_add(1, Ordering::AcqRel);
            *self.checker.write().unwrap_or_else(|e| e.into_inner()) = loaded.checker;
            cache.clear();
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = loaded.policy.clone();
        for shard in 0..self.shard_count {
            self.mailboxes
                .post(shard, NodeMessage::Auth(loaded.policy.clone()));
        }
        info!(
            users = summary.users,
            acl_rules = summary.acl_rules,
            jwt = summary.jwt,
            allow_anonymous = summary.allow_anonymous,
            asked_by,
            "auth files reloaded: new connections and every later check use them"
        );
        Ok(summary)
    }
}

/// One pool thread: takes checks until the process ends (the `Auth` is dropped).
fn verifier_thread(auth: &std::sync::Weak<Auth>, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let Some(auth) = auth.upgrade() else {
            return;
        };
        let generation = auth.generation.load(Ordering::Acquire);
        let checker = auth
            .checker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (verdict, cacheable) = checker.check(&job.credentials);
        if let (Verdict::Accepted(principal), true) = (&verdict, cacheable) {
            auth.remember(&job.credentials, principal, generation);
        }
        auth.mailboxes.post(
            job.shard,
            NodeMessage::Verified {
                connection: job.connection,
                ticket: job.ticket,
                verdict,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const SECRET: &str = "a-unit-test-secret-of-at-least-32-bytes";

    /// A directory of its own for one test's files.
    fn directory(name: &str) -> std::path::PathBuf {
        let directory =
            std::env::temp_dir().join(format!("shardmq-auth-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    fn config(overrides: &str) -> AuthConfig {
        Config::from_overrides(&format!("[auth]\n{overrides}"), "test")
            .unwrap()
            .auth
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn hs256(claims: &Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn credentials(username: &str, password: &str) -> Credentials {
        Credentials {
            client_id: ByteString::from_static("c"),
            username: Some(ByteString::from(username)),
            password: Some(bytes::Bytes::copy_from_slice(password.as_bytes())),
        }
    }

    fn username(verdict: &Verdict) -> Option<&str> {
        match verdict {
            Verdict::Accepted(principal) => principal.username.as_deref(),
            _ => None,
        }
    }

    fn hs256_checker(name: &str, acl_claim: &str) -> Checker {
        let directory = directory(name);
        let key = directory.join("key");
        std::fs::write(&key, format!("{SECRET}\n")).unwrap();
        let config = config(&format!(
            "jwt_key_file = \"{}\"\njwt_acl_claim = \"{acl_claim}\"\n",
            key.display()
        ));
        let loaded = load(&config).unwrap();
        assert!(
            loaded.policy.verify && !loaded.policy.allow_anonymous,
            "auto"
        );
        Arc::try_unwrap(loaded.checker).ok().unwrap()
    }

    #[test]
    fn tokens_are_checked_for_signature_exp_and_username() {
        let checker = hs256_checker("hs256", "");
        let good = hs256(&serde_json::json!({ "sub": "svc", "exp": now() + 600 }));
        assert_eq!(
            username(&checker.check(&credentials("", &good)).0),
            Some("svc")
        );
        let expired = hs256(&serde_json::json!({ "sub": "svc", "exp": now() - 600 }));
        let no_exp = hs256(&serde_json::json!({ "sub": "svc" }));
        let no_sub = hs256(&serde_json::json!({ "exp": now() + 600 }));
        let number_sub = hs256(&serde_json::json!({ "sub": 7, "exp": now() + 600 }));
        let other_key = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({ "sub": "svc", "exp": now() + 600 }),
            &jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!"),
        )
        .unwrap();
        let other_algorithm = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
            &serde_json::json!({ "sub": "svc", "exp": now() + 600 }),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        for (name, token) in [
            ("expired", expired),
            ("without exp", no_exp),
            ("without sub", no_sub),
            ("a number as sub", number_sub),
            ("another key", other_key),
            ("another algorithm", other_algorithm),
            ("not a token", "garbage".to_string()),
        ] {
            assert!(
                matches!(
                    checker.check(&credentials("", &token)).0,
                    Verdict::BadCredentials
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn an_unknown_user_costs_the_files_costliest_hash() {
        let directory = directory("decoy");
        let passwords = directory.join("passwords");
        let pbkdf2 = crate::passwd::Entry::new_pbkdf2(b"pw").unwrap();
        let argon = crate::passwd::Entry::new_argon2id(b"pw").unwrap();
        std::fs::write(
            &passwords,
            format!("alice:{}\nbob:{}\n", pbkdf2.encode(), argon.encode()),
        )
        .unwrap();
        let loaded = load(&config(&format!(
            "password_file = \"{}\"\n",
            passwords.display()
        )))
        .unwrap();
        assert_eq!(loaded.checker.decoy.as_ref(), Some(&argon));
        assert!(matches!(
            loaded.checker.check(&credentials("mallory", "pw")).0,
            Verdict::BadCredentials
        ));
    }

    #[test]
    fn issuer_audience_and_not_before_are_checked() {
        let directory = directory("issuer");
        let key = directory.join("key");
        std::fs::write(&key, format!("{SECRET}\n")).unwrap();
        let checker = |extra: &str| {
            let config = config(&format!("jwt_key_file = \"{}\"\n{extra}", key.display()));
            Arc::try_unwrap(load(&config).unwrap().checker)
                .ok()
                .unwrap()
        };
        let accepted = |checker: &Checker, claims: Value| {
            matches!(
                checker.check(&credentials("", &hs256(&claims))).0,
                Verdict::Accepted(_)
            )
        };
        let exp = now() + 600;
        let open = checker("");
        assert!(accepted(
            &open,
            serde_json::json!({ "sub": "a", "exp": exp, "iss": "anyone" })
        ));
        assert!(
            !accepted(
                &open,
                serde_json::json!({ "sub": "a", "exp": exp, "nbf": now() + 600 })
            ),
            "a token not valid yet is refused"
        );
        let strict = checker("jwt_issuer = \"https://idp.example\"\njwt_audience = \"mqtt\"\n");
        let claims = |iss: Option<&str>, aud: Option<&str>| {
            let mut claims = serde_json::json!({ "sub": "a", "exp": exp });
            if let Some(iss) = iss {
                claims["iss"] = iss.into();
            }
            if let Some(aud) = aud {
                claims["aud"] = aud.into();
            }
            claims
        };
        assert!(accepted(
            &strict,
            claims(Some("https://idp.example"), Some("mqtt"))
        ));
        assert!(!accepted(
            &strict,
            claims(Some("https://other.example"), Some("mqtt"))
        ));
        assert!(!accepted(
            &strict,
            claims(Some("https://idp.example"), Some("billing"))
        ));
        assert!(
            !accepted(&strict, claims(None, Some("mqtt"))),
            "iss required"
        );
        assert!(
            !accepted(&strict, claims(Some("https://idp.example"), None)),
            "aud required"
        );
    }

    #[test]
    fn a_tokens_acl_claim_becomes_its_rules() {
        let checker = hs256_checker("claims", "mqtt");
        let token = hs256(&serde_json::json!({
            "sub": "svc", "exp": now() + 600,
            "mqtt": { "publish": ["svc/out/#"], "subscribe": ["svc/in/+"] }
        }));
        let Verdict::Accepted(principal) = checker.check(&credentials("", &token)).0 else {
            panic!("refused");
        };
        // Whatever its claims, a token's verdict is never cached: its `exp` is checked at
        // every CONNECT (a cached one would outlive it).
        let bare = hs256(&serde_json::json!({ "sub": "svc", "exp": now() + 600 }));
        assert!(!checker.check(&credentials("", &token)).1);
        assert!(!checker.check(&credentials("", &bare)).1);
        let policy = Policy::open();
        let principal = Some(&principal);
        assert!(policy.may_publish(principal, "c", "svc/out/a"));
        assert!(!policy.may_publish(principal, "c", "svc/in/a"));
        assert!(policy.may_subscribe(principal, "c", "svc/in/+"));
        assert!(!policy.may_subscribe(principal, "c", "svc/#"));
        // Without the claim, nothing; a malformed claim refuses the token.
        let bare = hs256(&serde_json::json!({ "sub": "svc", "exp": now() + 600 }));
        let Verdict::Accepted(bare) = checker.check(&credentials("", &bare)).0 else {
            panic!("refused");
        };
        assert!(!policy.may_publish(Some(&bare), "c", "svc/out/a"));
        for claim in [
            serde_json::json!(["svc/#"]),
            serde_json::json!({ "publish": "svc/#" }),
            serde_json::json!({ "publish": [7] }),
            serde_json::json!({ "publish": ["a\nuser x"] }),
            serde_json::json!({ "publish": ["a/%c-x"] }),
            serde_json::json!({ "subscribe": vec!["a"; CLAIM_FILTERS_MAX + 1] }),
        ] {
            let token =
                hs256(&serde_json::json!({ "sub": "svc", "exp": now() + 600, "mqtt": claim }));
            assert!(
                matches!(
                    checker.check(&credentials("", &token)).0,
                    Verdict::BadCredentials
                ),
                "{claim}"
            );
        }
    }

    #[test]
    fn es256_and_rs256_public_keys_from_pem() {
        let directory = directory("pem");
        for (algorithm, genpkey) in [
            (
                "ES256",
                ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            (
                "RS256",
                ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
        ] {
            let private = directory.join(format!("{algorithm}.key"));
            let public = directory.join(format!("{algorithm}.pub"));
            let made = std::process::Command::new("openssl")
                .arg("genpkey")
                .args(genpkey)
                .arg("-out")
                .arg(&private)
                .status()
                .expect("openssl is installed");
            assert!(made.success());
            let made = std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public)
                .status()
                .unwrap();
            assert!(made.success());
            let config = config(&format!(
                "jwt_algorithm = \"{algorithm}\"\njwt_key_file = \"{}\"\n",
                public.display()
            ));
            let checker = load(&config).unwrap().checker;
            let pem = std::fs::read(&private).unwrap();
            let (header, key) = if algorithm == "ES256" {
                (
                    jsonwebtoken::Algorithm::ES256,
                    jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
                )
            } else {
                (
                    jsonwebtoken::Algorithm::RS256,
                    jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
                )
            };
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(header),
                &serde_json::json!({ "sub": "device", "exp": now() + 600 }),
                &key,
            )
            .unwrap();
            assert_eq!(
                username(&checker.check(&credentials("", &token)).0),
                Some("device"),
                "{algorithm}"
            );
            // An HS256 token made with the public key as its secret (the classic confusion).
            let confused = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &serde_json::json!({ "sub": "device", "exp": now() + 600 }),
                &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
            )
            .unwrap();
            assert!(matches!(
                checker.check(&credentials("", &confused)).0,
                Verdict::BadCredentials
            ));
        }
        // A private key, or garbage, where a public key belongs: refused naming the key.
        std::fs::write(directory.join("bad.pub"), "not a key").unwrap();
        let config = config(&format!(
            "jwt_algorithm = \"ES256\"\njwt_key_file = \"{}\"\n",
            directory.join("bad.pub").display()
        ));
        let error = load(&config).err().unwrap();
        assert!(error.contains("auth.jwt_key_file"), "{error}");
    }

    #[test]
    fn files_are_checked_and_costly_hashes_refused() {
        let directory = directory("files");
        let passwords = directory.join("passwords");
        let entry = Entry::new_pbkdf2(b"pw").unwrap().encode();
        std::fs::write(&passwords, format!("alice:{entry}\n")).unwrap();
        let key = |name: &str| format!("password_file = \"{}\"\n{name}", passwords.display());
        let loaded = load(&config(&key(""))).unwrap();
        assert_eq!(loaded.summary().users, 1);
        let checker = loaded.checker;
        assert_eq!(
            username(&checker.check(&credentials("alice", "pw")).0),
            Some("alice")
        );
        assert!(
            checker.check(&credentials("alice", "pw")).1,
            "a password entry's verdict is cached"
        );
        assert!(matches!(
            checker.check(&credentials("alice", "PW")).0,
            Verdict::BadCredentials
        ));
        assert!(matches!(
            checker.check(&credentials("bob", "pw")).0,
            Verdict::BadCredentials
        ));
        let error = load(&config(&key("pbkdf2_iterations_max = 999\n")))
            .err()
            .unwrap();
        assert!(
            error.contains("auth.pbkdf2_iterations_max") && error.contains("alice"),
            "{error}"
        );
        let argon = Entry::Argon2id {
            memory_kib: 2048,
            passes: 1,
            lanes: 1,
            salt: vec![1; 16],
            hash: vec![2; 32],
        };
        std::fs::write(&passwords, format!("carol:{}\n", argon.encode())).unwrap();
        let error = load(&config(&key("argon2_memory_kib_max = 1024\n")))
            .err()
            .unwrap();
        assert!(error.contains("auth.argon2_memory_kib_max"), "{error}");
        let error = load(&config("acl_file = \"/nonexistent/acl\"\n"))
            .err()
            .unwrap();
        assert!(error.contains("auth.acl_file"), "{error}");
        std::fs::write(directory.join("short"), "short").unwrap();
        let error = load(&config(&format!(
            "jwt_key_file = \"{}\"\n",
            directory.join("short").display()
        )))
        .err()
        .unwrap();
        assert!(error.contains("at least 32"), "{error}");
        let bad = Config::from_overrides("[auth]\nallow_anonymous = \"maybe\"\n", "test");
        assert!(bad.err().unwrap().contains("auth.allow_anonymous"));
        let bad = Config::from_overrides("[auth]\njwt_algorithm = \"none\"\n", "test");
        assert!(bad.err().unwrap().contains("auth.jwt_algorithm"));
    }

    #[test]
    fn the_cache_keeps_proofs_until_a_reload() {
        let directory = directory("cache");
        let passwords = directory.join("passwords");
        let entry = Entry::new_pbkdf2(b"pw").unwrap().encode();
        std::fs::write(&passwords, format!("alice:{entry}\n")).unwrap();
        let config = config(&format!(
            "password_file = \"{}\"\ncredential_cache_max = 2\n",
            passwords.display()
        ));
        let mailboxes = Mailboxes::new(1, 16).unwrap();
        let (auth, _) = Auth::start(&config, mailboxes, 1).unwrap();
        let principal = Principal {
            username: Some(ByteString::from_static("alice")),
            claims: None,
        };
        let alice = credentials("alice", "pw");
        assert!(auth.cached(&alice).is_none());
        auth.remember(&alice, &principal, 0);
        assert!(auth.cached(&alice).is_some());
        assert!(
            auth.cached(&credentials("alice", "other")).is_none(),
            "keyed by the password"
        );
        // Bounded: a third entry pushes one out.
        auth.remember(&credentials("b", "1"), &principal, 0);
        auth.remember(&credentials("c", "2"), &principal, 0);
        assert_eq!(auth.cache.lock().unwrap().len(), 2);
        assert!(auth.cached(&alice).is_none(), "the oldest entry made room");
        assert!(auth.cached(&credentials("c", "2")).is_some());
        auth.reload("test").unwrap();
        assert_eq!(auth.cache.lock().unwrap().len(), 0, "a reload empties it");
        auth.remember(&alice, &principal, 0);
        assert!(
            auth.cached(&alice).is_none(),
            "a check older than the reload is not kept"
        );
    }
}
