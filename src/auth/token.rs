//! Device tokens: a fleet of devices cannot each get a line in a password file, so the
//! backend that provisions a device signs it a JWT instead, and the device sends it as its
//! MQTT password. The broker needs only the key, not a list of devices.
//!
//! One key is configured: `auth.jwt_hs256_secret` (HS256), or `auth.jwt_public_key`, a PEM
//! public key whose type fixes the algorithm (RSA: RS256, EC P-256: ES256). The algorithm is
//! never taken from the token, so `alg: none` and algorithm-confusion tokens (an RS256 public
//! key used as an HS256 secret) are refused as bad tokens.
//!
//! A token must carry `sub` (the device's identity, which must equal its client id) and `exp`
//! (no leeway: the issuer's and the broker's clocks are expected to agree). `nbf`, when
//! present, is checked too. `aud` and `iss` are not checked: Herald has no setting naming
//! its audience, and the key alone says who issued the token.

use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Bad signature, malformed, wrong algorithm, `alg: none`, missing `sub` or `exp`.
    Bad,
    /// Past its `exp` (or before its `nbf`).
    Expired,
}

/// Verifies device tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    alg: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::with(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 or ES256 according to the PEM public key in `path`. Errors name the file and
    /// the reason, never the key's content.
    pub fn from_public_key_file(path: &Path) -> Result<Verifier, String> {
        let shown = path.display();
        let pem = std::fs::read(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
        Verifier::from_public_key_pem(&pem).map_err(|e| format!("{shown}: {e}"))
    }

    /// RS256 or ES256 according to the PEM public key `pem`.
    pub fn from_public_key_pem(pem: &[u8]) -> Result<Verifier, String> {
        if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err(
                "is a private key: give the public key only (the broker verifies, it never signs)"
                    .into(),
            );
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier::with(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            // The SEC1 point: 65 bytes uncompressed or 33 compressed on P-256; P-384 and
            // P-521 points are longer, and would fail every ES256 signature.
            let point = key.as_bytes();
            let p256 = (point.len() == 65 && point[0] == 4)
                || (point.len() == 33 && matches!(point[0], 2 | 3));
            if !p256 {
                return Err("is an EC key but not on P-256 (ES256 needs P-256)".into());
            }
            return Ok(Verifier::with(key, Algorithm::ES256));
        }
        Err("not a PEM RSA or EC P-256 public key".into())
    }

    fn with(key: DecodingKey, alg: Algorithm) -> Verifier {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Verifier {
            key,
            validation,
            alg,
        }
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// HMAC is microseconds; RSA and ECDSA verification are worth taking off the async
    /// workers.
    pub fn is_cheap(&self) -> bool {
        self.alg == Algorithm::HS256
    }

    /// Checks the token's signature and times, and returns its `sub`.
    pub fn verify(&self, token: &[u8]) -> Result<String, TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => Ok(data.claims.sub),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => {
                    Err(TokenError::Expired)
                }
                _ => Err(TokenError::Bad),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    pub(crate) const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    pub(crate) fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    pub(crate) fn hs256_token(sub: &str, exp: u64) -> String {
        let claims = serde_json::json!({ "sub": sub, "exp": exp });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn b64(data: &[u8]) -> String {
        // base64url without padding, by hand: the test must not trust the library under test.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    /// An ES256 key pair: (private PKCS#8 PEM, public PEM).
    pub(crate) fn es256_keys() -> (String, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        (kp.serialize_pem(), kp.public_key_pem())
    }

    pub(crate) fn es256_token(private_pem: &str, sub: &str, exp: u64) -> String {
        let claims = serde_json::json!({ "sub": sub, "exp": exp });
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    /// A 2048-bit RSA public key (openssl genpkey; the private half was thrown away): rcgen
    /// with ring cannot generate RSA keys, so RS256 signatures are not tested end to end,
    /// only that an RSA key selects RS256 and refuses everything else.
    const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw+D1k+NAByJLoF2C3gw7
uT1LbbNUQUSlJjblPc/c7hENS0qFDOQR2+REZJk09gDCzNBeIq2w/8KqW7WjH1ye
FcJPFoG1f0dm1ydSp5xlGbHyzSaCuZnIKSZrOl94gt0HXp58CwILbDpZSPzckpCH
JInx/rbvfFHz3x7QnAXht1c2h5p9gp655LQ/M0/DWA0TPL4PNy4PAqCc06mcrWUP
pZrhipkQ+y8q9QvCwG5DaDfL1GFO3lHGaa1qpq775EUk1qX51bIRpg0qDYjfaWcU
LgTjU5FDl1b8baofDaq4Uz+entfmJHAP5FrCOHbi29zThM8pzSf5qMlUI8EinVGw
3wIDAQAB
-----END PUBLIC KEY-----
";

    #[test]
    fn hs256_valid_expired_and_tampered() {
        let v = Verifier::hs256(SECRET);
        assert!(v.is_cheap());
        let t = hs256_token("dev1", now() + 600);
        assert_eq!(v.verify(t.as_bytes()), Ok("dev1".to_string()));
        let t = hs256_token("dev1", now() - 60);
        assert_eq!(v.verify(t.as_bytes()), Err(TokenError::Expired));
        // Signed with another secret.
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "dev1", "exp": now() + 600 }),
            &EncodingKey::from_secret(b"another secret of at least 32 bytes!!"),
        )
        .unwrap();
        assert_eq!(v.verify(other.as_bytes()), Err(TokenError::Bad));
        // A flipped payload keeps the signature of the old one.
        let good = hs256_token("dev1", now() + 600);
        let parts: Vec<&str> = good.split('.').collect();
        let forged_payload = b64(format!(r#"{{"sub":"dev2","exp":{}}}"#, now() + 600).as_bytes());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(v.verify(forged.as_bytes()), Err(TokenError::Bad));
        // Malformed.
        for junk in ["", "abc", "a.b", "a.b.c", "....", "\u{0}"] {
            assert_eq!(v.verify(junk.as_bytes()), Err(TokenError::Bad), "{junk:?}");
        }
        assert_eq!(v.verify(&[0xff, 0xfe, b'.', b'.']), Err(TokenError::Bad));
    }

    #[test]
    fn sub_and_exp_are_required() {
        let v = Verifier::hs256(SECRET);
        for claims in [
            serde_json::json!({ "exp": now() + 600 }),
            serde_json::json!({ "sub": "dev1" }),
            serde_json::json!({ "sub": 7, "exp": now() + 600 }),
        ] {
            let t = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            assert_eq!(v.verify(t.as_bytes()), Err(TokenError::Bad), "{claims}");
        }
        // With an audience (not checked) and a future nbf (checked).
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "d", "exp": now() + 600, "aud": "someone" }),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(v.verify(t.as_bytes()), Ok("d".into()));
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "d", "exp": now() + 600, "nbf": now() + 300 }),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(v.verify(t.as_bytes()), Err(TokenError::Expired));
    }

    #[test]
    fn alg_none_is_refused() {
        let v = Verifier::hs256(SECRET);
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(format!(r#"{{"sub":"dev1","exp":{}}}"#, now() + 600).as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_eq!(v.verify(token.as_bytes()), Err(TokenError::Bad), "{token}");
        }
        let header = b64(br#"{"alg":"None"}"#);
        assert_eq!(
            v.verify(format!("{header}.{payload}.").as_bytes()),
            Err(TokenError::Bad)
        );
    }

    #[test]
    fn es256_and_algorithm_confusion() {
        let (private, public) = es256_keys();
        let v = Verifier::from_public_key_pem(public.as_bytes()).unwrap();
        assert_eq!(v.algorithm(), Algorithm::ES256);
        assert!(!v.is_cheap());
        let t = es256_token(&private, "dev9", now() + 600);
        assert_eq!(v.verify(t.as_bytes()), Ok("dev9".into()));
        assert_eq!(
            v.verify(es256_token(&private, "dev9", now() - 10).as_bytes()),
            Err(TokenError::Expired)
        );
        // Another key pair's signature.
        let (other, _) = es256_keys();
        assert_eq!(
            v.verify(es256_token(&other, "dev9", now() + 600).as_bytes()),
            Err(TokenError::Bad)
        );
        // HS256 "signed" with the public key's text (the classic confusion attack).
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "dev9", "exp": now() + 600 }),
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(t.as_bytes()), Err(TokenError::Bad));
        // And an HS256 verifier refuses ES256 tokens.
        let hs = Verifier::hs256(SECRET);
        assert_eq!(
            hs.verify(es256_token(&private, "dev9", now() + 600).as_bytes()),
            Err(TokenError::Bad)
        );
    }

    #[test]
    fn rsa_key_selects_rs256() {
        let v = Verifier::from_public_key_pem(RSA_PUBLIC.as_bytes()).unwrap();
        assert_eq!(v.algorithm(), Algorithm::RS256);
        assert!(!v.is_cheap());
        let (private, _) = es256_keys();
        assert_eq!(
            v.verify(es256_token(&private, "d", now() + 600).as_bytes()),
            Err(TokenError::Bad)
        );
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "d", "exp": now() + 600 }),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(t.as_bytes()), Err(TokenError::Bad));
    }

    #[test]
    fn key_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = es256_keys();
        let p = dir.path().join("private.pem");
        std::fs::write(&p, &private).unwrap();
        let e = Verifier::from_public_key_file(&p).unwrap_err();
        assert!(e.contains("private key"), "{e}");
        assert!(!e.contains("BEGIN"), "{e}");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let p = dir.path().join("p384.pem");
        std::fs::write(&p, p384.public_key_pem()).unwrap();
        let e = Verifier::from_public_key_file(&p).unwrap_err();
        assert!(e.contains("P-256"), "{e}");
        let p = dir.path().join("junk.pem");
        std::fs::write(&p, "hello").unwrap();
        let e = Verifier::from_public_key_file(&p).unwrap_err();
        assert!(e.contains("junk.pem: not a PEM"), "{e}");
        let e = Verifier::from_public_key_file(&dir.path().join("missing.pem")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
