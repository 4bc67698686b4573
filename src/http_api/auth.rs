//! Bearer tokens for the HTTP API (`http.tokens`).
//!
//! The presented token and every configured one are compared as SHA-256 digests, so every
//! comparison is over 32 bytes whatever the lengths, with `subtle`'s constant-time equality,
//! and against every configured token (no early exit on a match): the time of an answer
//! tells nothing about how much of a token was right, nor which token matched. Tokens are
//! never logged: a refusal logs the peer-independent reason only.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{counted, error, Api};
use crate::config::Secret;

/// The digests of the configured tokens. Empty: no authentication (the configuration
/// allows that on a loopback listener only).
pub struct Tokens(Vec<[u8; 32]>);

impl Tokens {
    pub fn new(tokens: &[Secret]) -> Tokens {
        Tokens(
            tokens
                .iter()
                .map(|t| Sha256::digest(t.expose().as_bytes()).into())
                .collect(),
        )
    }

    /// Whether `presented` is one of the tokens, in time independent of which and how much.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        let mut ok = subtle::Choice::from(0);
        for t in &self.0 {
            ok |= t.ct_eq(&d);
        }
        ok.into()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The token of `Authorization: Bearer TOKEN` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Middleware on every API route: 401 unless a configured token is presented.
pub async fn require_token(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    if api.tokens.is_empty() {
        return next.run(req).await;
    }
    let why = match bearer(req.headers()) {
        Some(t) if api.tokens.accepts(t) => return next.run(req).await,
        Some(_) => "the bearer token is not one of http.tokens",
        None => "missing `Authorization: Bearer TOKEN`",
    };
    if crate::lograte::allow(crate::lograte::Reason::LoginRefused) {
        tracing::info!(reason = why, "HTTP API request refused");
    }
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", why);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    counted("auth", r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_configured_token_and_nothing_else() {
        let t = Tokens::new(&[
            Secret::new("first-token-0123456"),
            Secret::new("second-token-abcdef"),
        ]);
        assert!(t.accepts(b"first-token-0123456"));
        assert!(t.accepts(b"second-token-abcdef"));
        assert!(!t.accepts(b"first-token-012345"));
        assert!(!t.accepts(b""));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
