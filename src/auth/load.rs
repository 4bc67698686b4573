//! Reading the files `config.auth` names: all of them at start (`Auth::load`), the password
//! file and the ACL again on SIGHUP (`Auth::reload`).

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::{Config, TlsIdentity};
use crate::topic::PushTemplate;

use super::acl::Acl;
use super::limiter::Limiter;
use super::password::PasswordFile;
use super::token::Verifier;
use super::workers::Workers;
use super::Auth;

/// The parts SIGHUP re-reads, swapped together so a check never sees a new password file
/// with an old ACL.
#[derive(Default)]
pub(super) struct Files {
    pub(super) passwords: Option<PasswordFile>,
    pub(super) acl: Option<Acl>,
}

impl Files {
    fn read(passwords: Option<&Path>, acl: Option<&Path>) -> Result<Files, String> {
        let passwords = passwords
            .map(PasswordFile::load)
            .transpose()
            .map_err(|e| format!("auth.password_file: {e}"))?;
        let acl = acl
            .map(Acl::load)
            .transpose()
            .map_err(|e| format!("auth.acl_file: {e}"))?;
        Ok(Files { passwords, acl })
    }
}

impl Auth {
    /// Reads the password file, ACL file and JWT key named in `config.auth` (and notes
    /// tls.identity, push.topic_template, allow_anonymous). Errors are one line naming the
    /// config key, the file, the line number where there is one, and the reason, e.g.
    /// "auth.password_file: /etc/herald/passwd:3: not user:hash". Never include secret
    /// values.
    pub fn load(config: &Config) -> Result<Auth, String> {
        Auth::load_with_workers(config, Workers::default_permits())
    }

    pub(super) fn load_with_workers(config: &Config, permits: usize) -> Result<Auth, String> {
        let a = &config.auth;
        let files = Files::read(a.password_file.as_deref(), a.acl_file.as_deref())?;
        let token = match (&a.jwt_hs256_secret, &a.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err("auth.jwt_public_key: set only one of auth.jwt_hs256_secret and auth.jwt_public_key".into())
            }
            (Some(secret), None) => Some(Verifier::hs256(secret.expose().as_bytes())),
            (None, Some(path)) => Some(
                Verifier::from_public_key_file(path)
                    .map_err(|e| format!("auth.jwt_public_key: {e}"))?,
            ),
            (None, None) => None,
        };
        let cert_identity = config.tls.identity == TlsIdentity::Cert;
        let allow_anonymous = config.allow_anonymous();
        let open = !a.has_source() && !cert_identity && a.acl_file.is_none() && allow_anonymous;
        Ok(Auth {
            password_path: a.password_file.clone(),
            acl_path: a.acl_file.clone(),
            files: RwLock::new(Arc::new(files)),
            token: token.map(Arc::new),
            cert_identity,
            allow_anonymous,
            open,
            push: PushTemplate::new(&config.push.topic_template),
            limiter: Limiter::new(a.max_failures, a.failure_window),
            workers: Workers::new(permits),
        })
    }

    /// SIGHUP: re-read the password file and the ACL file. On any error keep the old ones and
    /// return the error (the caller logs it). The JWT key is not re-read.
    pub fn reload(&self) -> Result<(), String> {
        if self.password_path.is_none() && self.acl_path.is_none() {
            return Ok(());
        }
        let files = Files::read(self.password_path.as_deref(), self.acl_path.as_deref())?;
        let users = files.passwords.as_ref().map_or(0, |p| p.len());
        *self.files.write() = Arc::new(files);
        tracing::info!(
            users,
            acl = self.acl_path.is_some(),
            "password file and ACL reloaded"
        );
        Ok(())
    }
}
