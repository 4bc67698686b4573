//! The password file: backends (users) log in with a name and a password checked against an
//! argon2 hash, so that a stolen file does not hand out the passwords.
//!
//! The format is Mosquitto's `user:hash`, one user a line, with argon2 PHC strings as hashes
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`; `$argon2i$` and `$argon2d$` are accepted
//! too). Blank lines and lines starting with `#` are kept as they are. Anything else is an
//! error naming the line, because a line the broker skipped silently is a user who cannot
//! log in and nobody knows why.
//!
//! New hashes (`herald passwd`) are argon2id with the `argon2` crate's defaults (m = 19456
//! KiB, t = 2, p = 1, OWASP's minimum). Verification takes its cost from each hash string, so
//! a file can mix parameters and old hashes keep working after the defaults change; the cost
//! of a login is whatever the file's author chose.
//!
//! Errors and `Debug` never show a hash or a password: an error names the file, the line and
//! the user.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHashString, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// The users of one password file.
pub struct PasswordFile {
    users: HashMap<String, PasswordHashString>,
    /// The first user's hash: verified against for unknown users so that a missing user takes
    /// as long as a wrong password (no user enumeration by timing).
    decoy: Option<PasswordHashString>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Reads and checks a password file. Errors are `FILE:LINE: reason`.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        PasswordFile::parse(&text, &path.display().to_string())
    }

    /// Parses password-file text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, String> {
        let mut users = HashMap::new();
        let mut decoy = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("{origin}:{n}: not user:hash"));
            };
            if let Err(e) = check_username(user) {
                return Err(format!("{origin}:{n}: {e}"));
            }
            let hash = parse_hash(hash).map_err(|e| format!("{origin}:{n}: user {user:?}: {e}"))?;
            if users.contains_key(user) {
                return Err(format!("{origin}:{n}: user {user:?} appears twice"));
            }
            if decoy.is_none() {
                decoy = Some(hash.clone());
            }
            users.insert(user.to_string(), hash);
        }
        Ok(PasswordFile { users, decoy })
    }

    /// The hash of `user`, if the file has that user.
    pub fn hash_of(&self, user: &str) -> Option<&PasswordHashString> {
        self.users.get(user)
    }

    /// A hash to burn the same time on for a user who is not in the file.
    pub fn decoy(&self) -> Option<&PasswordHashString> {
        self.decoy.as_ref()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// An argon2 PHC string with parameters argon2 accepts.
fn parse_hash(s: &str) -> Result<PasswordHashString, String> {
    const NOT_PHC: &str = "hash is not an argon2 PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash; make one with `herald passwd`)";
    let hash = PasswordHashString::new(s).map_err(|_| NOT_PHC.to_string())?;
    let parsed = hash.password_hash();
    if !matches!(
        parsed.algorithm.as_str(),
        "argon2id" | "argon2i" | "argon2d"
    ) {
        return Err(NOT_PHC.to_string());
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("hash has no salt or no output".to_string());
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    Ok(hash)
}

/// Does `password` match `hash`? Costs a full argon2 computation: call it off the async
/// workers. The final comparison is constant-time (the `password-hash` crate's `Output`).
pub fn verify(hash: &PasswordHashString, password: &[u8]) -> bool {
    Argon2::default()
        .verify_password(password, &hash.password_hash())
        .is_ok()
}

/// A new argon2id hash of `password` with the default parameters and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// User names: non-empty, no `:` (the separator), no whitespace or control characters.
pub fn check_username(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if user.contains(':') {
        return Err(format!("user name {user:?} contains ':'"));
    }
    if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "user name {user:?} contains whitespace or a control character"
        ));
    }
    Ok(())
}

/// `herald passwd FILE USER` (delete=false) adds or replaces USER with an argon2id hash of
/// `password`; `herald passwd -D FILE USER` (delete=true) removes USER (error if absent).
/// Creates the file if missing with mode 0600, keeps other lines and their order, writes
/// atomically (temp file in the same dir + rename). Usernames: non-empty, no ':' and no
/// whitespace/control chars.
pub fn update_file(path: &Path, user: &str, password: Option<&str>) -> Result<(), String> {
    let shown = path.display();
    check_username(user)?;
    if password == Some("") {
        return Err("empty password".into());
    }
    let (text, mode) = match std::fs::read_to_string(path) {
        Ok(t) => (t, existing_mode(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if password.is_none() {
                return Err(format!("{shown}: no such file"));
            }
            (String::new(), None)
        }
        Err(e) => return Err(format!("{shown}: cannot read: {e}")),
    };
    let new_line = match password {
        Some(p) => Some(format!("{user}:{}", hash_password(p)?)),
        None => None,
    };
    let mut out = String::with_capacity(text.len() + 128);
    let mut found = false;
    for line in text.lines() {
        let is_user =
            line.split_once(':').is_some_and(|(u, _)| u == user) && !line.starts_with('#');
        if is_user {
            // Replace the first; drop any duplicate (the broker would refuse the file).
            if !found {
                if let Some(l) = &new_line {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    match (&new_line, found) {
        (None, false) => return Err(format!("{shown}: no user {user:?}")),
        (Some(l), false) => {
            out.push_str(l);
            out.push('\n');
        }
        _ => {}
    }
    write_atomically(path, out.as_bytes(), mode.unwrap_or(0o600))
}

#[cfg(unix)]
fn existing_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn existing_mode(_path: &Path) -> Option<u32> {
    None
}

/// Writes `data` to a temporary file next to `path` (same file system), syncs it and renames
/// it over `path`: a reader (the broker on SIGHUP) sees the old file or the new one, never
/// half of one.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{shown}: not a file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts
            .open(&tmp)
            .map_err(|e| format!("{}: cannot create: {e}", tmp.display()))?;
        #[cfg(unix)]
        {
            // The umask may have narrowed the mode; set it exactly.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: cannot set mode: {e}", tmp.display()))?;
        }
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: cannot write: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{shown}: cannot replace: {e}"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the new password: from the terminal with a prompt twice (rpassword) when stdin is a
/// tty (must match), else one line from stdin (trailing newline stripped). Empty password
/// refused.
pub fn read_new_password() -> Result<String, String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        let again = rpassword::prompt_password("Password again: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            first.as_bytes(),
            again.as_bytes(),
        )) {
            return Err("the passwords do not match".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        strip_newline(line)
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    Ok(password)
}

fn strip_newline(mut line: String) -> String {
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    line
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A hash with the cheapest parameters argon2 allows: debug builds verify it in
    /// microseconds instead of seconds.
    pub(crate) fn cheap_hash(password: &str) -> String {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        a.hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    #[test]
    fn right_wrong_and_unknown() {
        let text = format!(
            "# backends\n\nbackend:{}\nops:{}\n",
            cheap_hash("s3cret"),
            cheap_hash("other")
        );
        let f = PasswordFile::parse(&text, "pw").unwrap();
        assert_eq!(f.len(), 2);
        let h = f.hash_of("backend").unwrap();
        assert!(verify(h, b"s3cret"));
        assert!(!verify(h, b"s3cret "));
        assert!(!verify(h, b""));
        assert!(f.hash_of("nobody").is_none());
        assert!(f.decoy().is_some());
        assert!(!format!("{f:?}").contains("argon2"));
    }

    #[test]
    fn argon2i_and_d_are_accepted() {
        for alg in [argon2::Algorithm::Argon2i, argon2::Algorithm::Argon2d] {
            let params = argon2::Params::new(8, 1, 1, None).unwrap();
            let a = Argon2::new(alg, argon2::Version::V0x13, params);
            let h = a
                .hash_password(b"pw", &SaltString::generate(&mut OsRng))
                .unwrap()
                .to_string();
            let f = PasswordFile::parse(&format!("u:{h}\n"), "pw").unwrap();
            assert!(verify(f.hash_of("u").unwrap(), b"pw"));
        }
    }

    #[test]
    fn parse_errors_name_the_line_and_not_the_hash() {
        let good = cheap_hash("x");
        let cases = [
            (format!("a:{good}\nnocolon\n"), "pw:2: not user:hash"),
            (
                format!("\n\nb c:{good}\n"),
                "pw:3: user name \"b c\" contains whitespace",
            ),
            (format!(":{good}\n"), "pw:1: empty user name"),
            (
                "u:$7$101$abc$def\n".to_string(),
                "pw:1: user \"u\": hash is not an argon2",
            ),
            (
                "u:$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA\n".to_string(),
                "pw:1: user \"u\": hash is not an argon2",
            ),
            (
                "u:plaintextpassword\n".to_string(),
                "pw:1: user \"u\": hash is not an argon2",
            ),
            (
                format!("u:{good}\nu:{good}\n"),
                "pw:2: user \"u\" appears twice",
            ),
        ];
        for (text, want) in cases {
            let e = PasswordFile::parse(&text, "pw").unwrap_err();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
            assert!(
                !e.contains("plaintextpassword") && !e.contains(&good) && !e.contains("abc$def"),
                "{e}"
            );
        }
    }

    #[test]
    fn passwd_add_replace_delete_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let other = cheap_hash("other");
        std::fs::write(&path, format!("# team\nalice:{other}\n\nzed:{other}\n")).unwrap();

        // Add (default parameters: one slow hash in debug builds, done once).
        update_file(&path, "bob", Some("bob-pw")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "# team",
                &format!("alice:{other}"),
                "",
                &format!("zed:{other}")
            ]
        );
        assert!(
            lines[4].starts_with("bob:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            lines[4]
        );
        let f = PasswordFile::load(&path).unwrap();
        assert!(verify(f.hash_of("bob").unwrap(), b"bob-pw"));

        // Replace in place: cheap to check by swapping in a known line.
        let bob_line = lines[4].to_string();
        update_file(&path, "alice", Some("new")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[1].starts_with("alice:$argon2id$"));
        assert_ne!(lines[1], format!("alice:{other}"));
        assert_eq!(lines[4], bob_line);

        // Delete.
        update_file(&path, "alice", None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("# team\n\nzed:{other}\n{bob_line}\n"));
        let e = update_file(&path, "alice", None).unwrap_err();
        assert!(e.contains("no user \"alice\""), "{e}");
        assert!(update_file(&path, "a:b", Some("x")).is_err());
        assert!(update_file(&path, "a b", Some("x")).is_err());
        assert!(update_file(&path, "ab", Some("")).is_err());
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn passwd_creates_the_file_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new-passwd");
        assert!(update_file(&path, "u", None).is_err());
        update_file(&path, "u", Some("pw")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let f = PasswordFile::load(&path).unwrap();
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn newline_stripping() {
        assert_eq!(strip_newline("pw\n".into()), "pw");
        assert_eq!(strip_newline("pw\r\n".into()), "pw");
        assert_eq!(strip_newline("pw".into()), "pw");
        assert_eq!(strip_newline("pw \n".into()), "pw ");
    }
}
