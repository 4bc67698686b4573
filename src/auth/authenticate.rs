//! Who a CONNECT proves to be: a client certificate, a password-file user, a device token,
//! or no one (the order and the rules are in the parent module's doc).

use std::sync::Arc;

use crate::metrics::{self, AuthFailure};

use super::load::Files;
use super::password;
use super::token::TokenError;
use super::{Auth, Credentials, Principal, Refusal};

type Failure = (Refusal, AuthFailure);

impl Auth {
    /// Proves who the client is and that it may use `client_id`. Every failure is counted
    /// (`herald_auth_failures_total`), logged at info without the password or token, and
    /// counted against the peer's address by the limiter.
    pub async fn authenticate(&self, c: Credentials<'_>) -> Result<Principal, Refusal> {
        if self.open {
            return Ok(Principal::Anonymous);
        }
        if self.limiter.is_blocked(c.peer) {
            self.log_failure(
                &c,
                AuthFailure::Blocked,
                Refusal::NotAuthorized.connack_code(),
            );
            return Err(Refusal::NotAuthorized);
        }
        match self.check(&c).await {
            Ok(p) => Ok(p),
            Err((refusal, reason)) => {
                self.limiter.record_failure(c.peer);
                self.log_failure(&c, reason, refusal.connack_code());
                Err(refusal)
            }
        }
    }

    fn log_failure(&self, c: &Credentials<'_>, reason: AuthFailure, code: u8) {
        metrics::auth_failure(reason);
        if reason == AuthFailure::Blocked {
            // A flood from one address would be one line per attempt; the counter has it.
            tracing::debug!(peer = %c.peer, client_id = %c.client_id, "login refused: too many failures from this address");
            return;
        }
        if crate::lograte::allow(crate::lograte::Reason::LoginRefused) {
            tracing::info!(
                peer = %c.peer,
                client_id = %c.client_id,
                username = %c.username.unwrap_or(""),
                code,
                reason = reason.label(),
                "refused CONNECT: login refused"
            );
        }
    }

    async fn check(&self, c: &Credentials<'_>) -> Result<Principal, Failure> {
        // 1. A verified client certificate is the identity; credentials are ignored then.
        if let Some(identity) = c.cert_identity.filter(|_| self.cert_identity) {
            return if identity.as_bytes() == c.client_id.as_bytes() {
                Ok(Principal::Device)
            } else {
                Err((Refusal::NotAuthorized, AuthFailure::ClientId))
            };
        }
        let files = self.files.read().clone();
        // 2. A password-file user.
        if let (Some(user), Some(passwords)) = (c.username, &files.passwords) {
            if let Some(hash) = passwords.hash_of(user) {
                let Some(password) = c.password else {
                    return Err((Refusal::BadCredentials, AuthFailure::BadPassword));
                };
                if !self.verify_password(hash, password).await {
                    return Err((Refusal::BadCredentials, AuthFailure::BadPassword));
                }
                if !self.user_may_use(&files, user, c.client_id) {
                    return Err((Refusal::NotAuthorized, AuthFailure::ClientId));
                }
                return Ok(Principal::User(Arc::from(user)));
            }
        }
        // 3. A device token in the password field.
        if let (Some(verifier), Some(token)) = (&self.token, c.password) {
            let verdict = if verifier.is_cheap() {
                verifier.verify(token)
            } else {
                let verifier = verifier.clone();
                let token = token.to_vec();
                self.workers
                    .run(move || verifier.verify(&token))
                    .await
                    .unwrap_or(Err(TokenError::Bad))
            };
            return match verdict {
                Ok(sub) if sub.as_bytes() == c.client_id.as_bytes() => Ok(Principal::Device),
                Ok(_) => Err((Refusal::NotAuthorized, AuthFailure::ClientId)),
                Err(TokenError::Expired) => {
                    Err((Refusal::NotAuthorized, AuthFailure::ExpiredToken))
                }
                Err(TokenError::Bad) => Err((Refusal::BadCredentials, AuthFailure::BadToken)),
            };
        }
        // 4. Credentials nothing can check.
        if c.username.is_some() || c.password.is_some() {
            if let Some(passwords) = &files.passwords {
                // Take as long as a wrong password would, so that timing does not tell
                // which user names exist.
                if let (Some(decoy), Some(password)) = (passwords.decoy(), c.password) {
                    self.verify_password(decoy, password).await;
                }
                return Err((Refusal::BadCredentials, AuthFailure::UnknownUser));
            }
            return Err((Refusal::NotAuthorized, AuthFailure::UnknownUser));
        }
        // 5. No credentials.
        if self.allow_anonymous {
            Ok(Principal::Anonymous)
        } else {
            Err((Refusal::NotAuthorized, AuthFailure::Anonymous))
        }
    }

    async fn verify_password(
        &self,
        hash: &argon2::password_hash::PasswordHashString,
        password: &[u8],
    ) -> bool {
        let hash = hash.clone();
        let secret = password.to_vec();
        self.workers
            .run(move || password::verify(&hash, &secret))
            .await
            .unwrap_or(false)
    }

    /// The client ids a user may connect with: its ACL `clientid` lines, else its user name
    /// alone or followed by a separator (`-`, `/`, `_`, `.`, `:`) and anything. A bare prefix
    /// is not enough: user `dev` must not connect as device `dev42`. An empty client id is
    /// always allowed (the broker generates one).
    fn user_may_use(&self, files: &Files, user: &str, client_id: &str) -> bool {
        if client_id.is_empty() {
            return true;
        }
        match files
            .acl
            .as_ref()
            .and_then(|acl| acl.clientid_allowed(user, client_id))
        {
            Some(allowed) => allowed,
            None => client_id
                .strip_prefix(user)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '/', '_', '.', ':'])),
        }
    }
}
