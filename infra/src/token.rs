//! Development tokens: HS256 JWTs signed with `LOCAL_JWT_SECRET`, the identity the API verifies
//! itself when no API Gateway authorizer ran (local stack only).

use anyhow::{bail, Context};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// The secret `make up` configures when `LOCAL_JWT_SECRET` is not set. Local use only.
/// At least 32 bytes: the API refuses shorter keys at start-up.
pub const DEFAULT_DEV_SECRET: &str = "export-cache-local-dev-secret-not-for-production";

/// Scopes of the demo user: may read exports and administer the tenant's cache.
pub const DEMO_SCOPES: &[&str] = &["exports:read", "exports:admin"];

/// The claims the API reads (see the contract): user, tenant, space separated scopes, times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevClaims {
    pub sub: String,
    pub tenant_id: String,
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
}

/// Mints an HS256 token for `user` of `tenant`, valid for `ttl_secs` from now.
pub fn dev_token(
    secret: &str,
    tenant: &str,
    user: &str,
    scopes: &[&str],
    ttl_secs: u64,
) -> anyhow::Result<String> {
    if secret.is_empty() {
        bail!("the signing secret is empty (set LOCAL_JWT_SECRET)");
    }
    if tenant.is_empty() || user.is_empty() {
        bail!("tenant and user must not be empty");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs();
    let claims = DevClaims {
        sub: user.to_owned(),
        tenant_id: tenant.to_owned(),
        scope: scopes.join(" "),
        iat: now,
        exp: now.saturating_add(ttl_secs),
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing the development token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    fn verify(token: &str, secret: &str) -> jsonwebtoken::errors::Result<DevClaims> {
        let validation = Validation::new(Algorithm::HS256);
        decode::<DevClaims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map(|data| data.claims)
    }

    #[test]
    fn token_carries_user_tenant_and_space_separated_scopes() {
        let token = dev_token("s3cret", "acme", "alice", DEMO_SCOPES, 600).unwrap();
        let claims = verify(&token, "s3cret").unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.tenant_id, "acme");
        assert_eq!(claims.scope, "exports:read exports:admin");
        assert_eq!(claims.exp - claims.iat, 600);
    }

    #[test]
    fn token_signed_with_another_secret_is_rejected() {
        let token = dev_token("one", "acme", "alice", &["exports:read"], 600).unwrap();
        assert!(verify(&token, "two").is_err());
    }

    #[test]
    fn header_says_hs256() {
        let token = dev_token("k", "globex", "bob", &[], 60).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
    }

    #[test]
    fn the_default_dev_secret_is_long_enough_for_the_api() {
        assert!(DEFAULT_DEV_SECRET.len() >= shared::config::MIN_LOCAL_JWT_SECRET_BYTES);
    }

    #[test]
    fn empty_secret_is_refused() {
        assert!(dev_token("", "acme", "alice", DEMO_SCOPES, 60).is_err());
    }
}
