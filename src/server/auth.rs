//! Bearer-token authentication: JWTs signed by a key whose public half was
//! given with `--jwtPublicKey`. Off with `--disableAuthentication`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

/// Verifies bearer tokens, or lets everything through when disabled.
pub enum Authenticator {
    Disabled,
    Jwt(Vec<(DecodingKey, Vec<Algorithm>)>),
}

impl Authenticator {
    /// Reads the public keys; authentication on with no key is a start-up error.
    pub fn new(disabled: bool, keys: &[PathBuf]) -> Result<Self> {
        if disabled {
            return Ok(Authenticator::Disabled);
        }
        if keys.is_empty() {
            bail!(
                "authentication is on but no --jwtPublicKey was given: \
                 pass --jwtPublicKey <pem> or --disableAuthentication"
            );
        }
        let mut out = Vec::new();
        for path in keys {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                out.push((
                    k,
                    vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
                ));
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                out.push((k, vec![Algorithm::ES256, Algorithm::ES384]));
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                out.push((k, vec![Algorithm::EdDSA]));
            } else {
                bail!(
                    "{} is not a PEM RSA, EC or Ed25519 public key",
                    path.display()
                );
            }
        }
        Ok(Authenticator::Jwt(out))
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, header: Option<&str>) -> Result<(), String> {
        let Authenticator::Jwt(keys) = self else {
            return Ok(());
        };
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or("missing Authorization: Bearer <token> header")?;
        let alg = decode_header(token)
            .map_err(|e| format!("malformed token: {e}"))?
            .alg;
        let mut last = String::from("no key accepts the token's algorithm");
        for (key, algs) in keys {
            if !algs.contains(&alg) {
                continue;
            }
            let mut v = Validation::new(alg);
            v.required_spec_claims.clear();
            v.validate_aud = false;
            match decode::<serde_json::Value>(token, key, &v) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("invalid token: {e}"),
            }
        }
        Err(last)
    }
}
