//! mosquitto's password file, as `mosquitto_passwd` writes it: one `user:hash` a line, where
//! the hash is
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 of the password over the salt's bytes
//!   (mosquitto ≥ 2.0's default, 101 iterations, 12-byte salt, 64-byte hash), or
//! - `$6$<salt>$<hash>`: SHA-512 of the password's bytes followed by the salt's (`-H sha512`,
//!   mosquitto ≤ 1.6's default),
//!
//! salt and hash in standard base64 with padding. Lines starting with `#` and empty lines are
//! skipped, as mosquitto skips them. Pure: parsing text and verifying, no files.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// More PBKDF2 rounds than this is a corrupt line, not a policy: each CONNECT computes them.
const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswdError {
    #[error("line {line}: expected user:hash")]
    NoColon { line: usize },
    #[error("line {line}: empty user name")]
    EmptyUser { line: usize },
    #[error("line {line}: user {user:?} appears twice")]
    Duplicate { line: usize, user: String },
    #[error("line {line} (user {user:?}): {why}; make the entry with mosquitto_passwd (-U hashes a plain-text file)")]
    Hash {
        line: usize,
        user: String,
        why: &'static str,
    },
}

/// One stored password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, &'static str> {
        let b64 = |s: &str, what| STANDARD.decode(s).map_err(|_| what);
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt, "salt is not base64")?,
                hash: b64(hash, "hash is not base64")?,
            }),
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_ITERATIONS).contains(n))
                    .ok_or("iteration count is not a number from 1 to 10000000")?;
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64(salt, "salt is not base64")?,
                    hash: b64(hash, "hash is not base64")?,
                })
            }
            _ => Err("not a $6$ or $7$ hash"),
        }
        .and_then(|h| match &h {
            Hash::Sha512 { hash, .. } | Hash::Pbkdf2 { hash, .. } if hash.len() != 64 => {
                Err("hash is not 64 bytes (SHA-512)")
            }
            _ => Ok(h),
        })
    }

    fn verify(&self, password: &[u8]) -> bool {
        let (computed, stored) = match self {
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                (d.finalize().to_vec(), hash)
            }
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                (out.to_vec(), hash)
            }
        };
        computed.ct_eq(stored).into()
    }
}

/// A parsed password file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

/// Verified against when the user is unknown, so an unknown name costs what a wrong password
/// does and timing does not tell which names exist.
fn decoy() -> Hash {
    Hash::Pbkdf2 {
        iterations: 101,
        salt: vec![0; 12],
        hash: vec![0; 64],
    }
}

impl PasswordFile {
    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim_end_matches(['\r', '\n']);
            if l.trim().is_empty() || l.starts_with('#') {
                continue;
            }
            let (user, hash) = l.split_once(':').ok_or(PasswdError::NoColon { line })?;
            if user.is_empty() {
                return Err(PasswdError::EmptyUser { line });
            }
            let hash = Hash::parse(hash.trim_end()).map_err(|why| PasswdError::Hash {
                line,
                user: user.to_string(),
                why,
            })?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(PasswdError::Duplicate {
                    line,
                    user: user.to_string(),
                });
            }
        }
        Ok(PasswordFile { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Compares in constant time; an unknown user costs the
    /// same as a known one.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => h.verify(password),
            None => {
                decoy().verify(password);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with mosquitto 2.0's `mosquitto_passwd -c -b` (alice, "user with space": `$7$`)
    /// and `-H sha512` (bob: `$6$`); carol's password is empty.
    const FILE: &str = "\
alice:$7$101$BuuebvKHrKf0JLIh$IFfKhZDEqb3UZpKs8NP4wirbs3ZiCIfr65V1wLswco6bv1hrpQ7EYGkXBLBCBBS013WLp6Y8aAIYxqOlwhgtjw==
user with space:$7$101$mjedo9F5n3yXlPsI$keDPflpWabU0JDnhoOS6Pa8lpFSzX84sKBbjxgO4Du760e0EzfbnEcN5+FLLTLEi4G+B8j+ShdgIeaJQryQxew==
bob:$6$DWUV04zXJ3TO6DWL$LRcWPI/06UX/Wwe1c77QQzxGM6E3MOfBgymR91Fj8jHT03O1lDqFoyasR6Y/hb4v0xTlk121/XkVAzHhdCedow==
carol:$7$101$CCjsYfkgn2V4O+KW$IXN1oBMYNyY4mA+EZTPzQ3zDAvIjwpjwFb3vXEUmVmGnWyJg8I+NWEEw2MZbWFkKaFluacVWMKXWtV3fYnDGBA==
";

    #[test]
    fn mosquitto_passwd_vectors_verify() {
        let f = PasswordFile::parse(FILE).expect("parses");
        assert_eq!(f.len(), 4);
        assert!(f.verify("alice", b"secret"));
        assert!(f.verify("user with space", "pässwörd".as_bytes()));
        assert!(f.verify("bob", b"hunter2"));
        assert!(f.verify("carol", b""));
    }

    #[test]
    fn wrong_passwords_and_unknown_users_fail() {
        let f = PasswordFile::parse(FILE).expect("parses");
        assert!(!f.verify("alice", b"Secret"));
        assert!(!f.verify("alice", b"secret "));
        assert!(!f.verify("alice", b""));
        assert!(!f.verify("bob", b"secret"));
        assert!(!f.verify("carol", b"x"));
        assert!(!f.verify("mallory", b"secret"));
        assert!(!f.verify("", b""));
    }

    #[test]
    fn comments_blank_lines_and_crlf_are_accepted() {
        let text = format!("# users\n\n{}", FILE.replace('\n', "\r\n"));
        let f = PasswordFile::parse(&text).expect("parses");
        assert_eq!(f.len(), 4);
        assert!(f.verify("bob", b"hunter2"));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line() {
        let err = |t: &str| PasswordFile::parse(t).expect_err("refused");
        assert_eq!(err("alice"), PasswdError::NoColon { line: 1 });
        assert_eq!(err("\n:$6$x$y"), PasswdError::EmptyUser { line: 2 });
        // A plain-text password (mosquitto_passwd -U converts these) is not taken as one.
        assert!(matches!(
            err("alice:secret"),
            PasswdError::Hash { line: 1, .. }
        ));
        assert!(matches!(
            err("a:$7$abc$AAAA$AAAA"),
            PasswdError::Hash { .. }
        ));
        assert!(matches!(err("a:$7$0$AAAA$AAAA"), PasswdError::Hash { .. }));
        assert!(matches!(err("a:$6$!!$AAAA"), PasswdError::Hash { .. }));
        assert!(
            matches!(err("a:$6$AAAA$AAAA"), PasswdError::Hash { why, .. } if why.contains("64 bytes"))
        );
        let twice = format!("{FILE}alice:$6$DWUV04zXJ3TO6DWL$LRcWPI/06UX/Wwe1c77QQzxGM6E3MOfBgymR91Fj8jHT03O1lDqFoyasR6Y/hb4v0xTlk121/XkVAzHhdCedow==\n");
        assert!(matches!(
            err(&twice),
            PasswdError::Duplicate { line: 5, .. }
        ));
    }
}
