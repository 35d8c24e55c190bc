//! Who is calling: verified JWT claims, never plain headers.
//!
//! In AWS the HTTP API JWT authorizer has already verified the token and hands its claims over in
//! the request context. Where no authorizer ran (local), the API verifies the bearer token itself
//! with a configured HS256 key, and refuses every call when no key is configured.

use std::collections::{BTreeSet, HashMap};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::key::Owner;

pub const SCOPE_READ: &str = "exports:read";
pub const SCOPE_ADMIN: &str = "exports:admin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub user: String,
    pub scopes: BTreeSet<String>,
}

impl Identity {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// Who files this caller asks for are built for.
    pub fn owner(&self) -> Owner<'_> {
        Owner {
            tenant: &self.tenant,
            user: &self.user,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token was sent")]
    Missing,
    #[error("the bearer token is not valid: {0}")]
    Invalid(String),
    #[error("the token has no usable `{0}` claim")]
    MissingClaim(String),
    #[error("no identity can be verified here: no authorizer ran and no local key is configured")]
    NotConfigured,
}

/// Tenant and user ids end up in keys and object paths: refuse anything that could escape them.
fn usable_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'|'))
}

/// Build an identity from claims already verified by someone (the API Gateway JWT authorizer, or
/// [`BearerVerifier`]). `scopes` are the authorizer's parsed scopes when it gave them.
pub fn identity_from_claims(
    claims: &HashMap<String, String>,
    scopes: Option<&[String]>,
    tenant_claim: &str,
) -> Result<Identity, AuthError> {
    let tenant = claims
        .get(tenant_claim)
        .filter(|t| usable_id(t))
        .ok_or_else(|| AuthError::MissingClaim(tenant_claim.to_string()))?;
    let user = claims
        .get("sub")
        .filter(|s| usable_id(s))
        .ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
    let mut set: BTreeSet<String> = scopes
        .unwrap_or_default()
        .iter()
        .map(|s| s.to_string())
        .collect();
    if set.is_empty() {
        // Access tokens carry `scope` (space separated) or `scp`; the authorizer flattens arrays
        // into "[a b]" strings, so strip brackets too.
        for name in ["scope", "scp"] {
            if let Some(v) = claims.get(name) {
                set.extend(
                    v.trim_matches(|c| c == '[' || c == ']')
                        .split([' ', ','])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
        }
    }
    Ok(Identity {
        tenant: tenant.clone(),
        user: user.clone(),
        scopes: set,
    })
}

/// Verifies `Authorization: Bearer` tokens locally (HS256 with a shared key).
#[derive(Clone)]
pub struct BearerVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerVerifier(HS256)")
    }
}

impl BearerVerifier {
    /// `issuer` / `audience`: when given, tokens must carry exactly that `iss` / `aud`.
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.required_spec_claims = required.iter().map(|s| s.to_string()).collect();
        validation.leeway = 30;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(
        &self,
        authorization: Option<&str>,
    ) -> Result<HashMap<String, String>, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Invalid("expected `Authorization: Bearer <token>`".into()))?
            .trim();
        let data = jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| AuthError::Invalid(e.kind_description()))?;
        Ok(data
            .claims
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Array(items) => items
                        .iter()
                        .filter_map(|i| i.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect())
    }
}

trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonwebtoken::errors::Error {
    fn kind_description(&self) -> String {
        use jsonwebtoken::errors::ErrorKind;
        match self.kind() {
            ErrorKind::ExpiredSignature => "the token has expired".into(),
            ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
            ErrorKind::InvalidIssuer => "the token is from another issuer".into(),
            ErrorKind::InvalidAudience => "the token is for another audience".into(),
            ErrorKind::InvalidSignature => "the signature does not verify".into(),
            ErrorKind::InvalidAlgorithm => "only HS256 tokens are accepted here".into(),
            ErrorKind::MissingRequiredClaim(c) => format!("the `{c}` claim is required"),
            _ => "the token is malformed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    const KEY: &str = "identity-test-key-of-at-least-32-bytes";

    fn exp() -> i64 {
        chrono::Utc::now().timestamp() + 600
    }

    #[test]
    fn verified_token_gives_tenant_user_and_scopes() {
        let v = BearerVerifier::hs256(KEY.as_bytes(), None, None);
        let t = token(
            KEY,
            serde_json::json!({"sub":"alice","tenant_id":"acme","scope":"exports:read exports:admin","exp":exp()}),
        );
        let claims = v.verify(Some(&format!("Bearer {t}"))).unwrap();
        let id = identity_from_claims(&claims, None, "tenant_id").unwrap();
        assert_eq!(id.tenant, "acme");
        assert_eq!(id.user, "alice");
        assert!(id.has_scope(SCOPE_READ) && id.has_scope(SCOPE_ADMIN));
    }

    #[test]
    fn wrong_key_expired_or_missing_tokens_are_refused() {
        let v = BearerVerifier::hs256(KEY.as_bytes(), None, None);
        let other = token(
            "other",
            serde_json::json!({"sub":"a","tenant_id":"acme","exp":exp()}),
        );
        assert!(matches!(
            v.verify(Some(&format!("Bearer {other}"))),
            Err(AuthError::Invalid(_))
        ));
        let old = token(
            KEY,
            serde_json::json!({"sub":"a","tenant_id":"acme","exp":1}),
        );
        assert_eq!(
            v.verify(Some(&format!("Bearer {old}"))),
            Err(AuthError::Invalid("the token has expired".into()))
        );
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        assert!(matches!(
            v.verify(Some("Basic abc")),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn unsigned_alg_none_tokens_are_refused() {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let forged = format!(
            "{}.{}.",
            b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(serde_json::json!({"sub": "mallory", "tenant_id": "acme", "exp": exp()}))
        );
        let v = BearerVerifier::hs256(KEY.as_bytes(), None, None);
        assert!(matches!(
            v.verify(Some(&format!("Bearer {forged}"))),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn tokens_not_yet_valid_are_refused() {
        let v = BearerVerifier::hs256(KEY.as_bytes(), None, None);
        let later = chrono::Utc::now().timestamp() + 300;
        let t = token(
            KEY,
            serde_json::json!({"sub":"a","tenant_id":"acme","exp":exp(),"nbf":later}),
        );
        assert_eq!(
            v.verify(Some(&format!("Bearer {t}"))),
            Err(AuthError::Invalid(
                "the token is not valid yet (nbf)".into()
            ))
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let v = BearerVerifier::hs256(KEY.as_bytes(), Some("https://idp"), Some("exports"));
        let with =
            |claims: serde_json::Value| v.verify(Some(&format!("Bearer {}", token(KEY, claims))));
        let ok = serde_json::json!({"sub":"a","tenant_id":"t","exp":exp(),"iss":"https://idp","aud":"exports"});
        assert!(with(ok).is_ok());
        for bad in [
            serde_json::json!({"sub":"a","tenant_id":"t","exp":exp(),"iss":"https://evil","aud":"exports"}),
            serde_json::json!({"sub":"a","tenant_id":"t","exp":exp(),"iss":"https://idp","aud":"other"}),
            serde_json::json!({"sub":"a","tenant_id":"t","exp":exp(),"aud":"exports"}),
            serde_json::json!({"sub":"a","tenant_id":"t","exp":exp(),"iss":"https://idp"}),
        ] {
            assert!(
                matches!(with(bad.clone()), Err(AuthError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn tenant_claim_is_configurable_and_required() {
        let claims: HashMap<String, String> = [("sub", "u"), ("custom:org", "acme")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(
            identity_from_claims(&claims, None, "custom:org")
                .unwrap()
                .tenant,
            "acme"
        );
        assert_eq!(
            identity_from_claims(&claims, None, "tenant_id"),
            Err(AuthError::MissingClaim("tenant_id".into()))
        );
    }

    #[test]
    fn tenant_ids_that_could_escape_a_key_are_refused() {
        let claims: HashMap<String, String> = [("sub", "u"), ("tenant_id", "../other")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert!(identity_from_claims(&claims, None, "tenant_id").is_err());
    }

    #[test]
    fn authorizer_scopes_win_over_claims() {
        let claims: HashMap<String, String> =
            [("sub", "u"), ("tenant_id", "t"), ("scope", "exports:admin")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        let id = identity_from_claims(&claims, Some(&["exports:read".to_string()]), "tenant_id")
            .unwrap();
        assert!(id.has_scope(SCOPE_READ) && !id.has_scope(SCOPE_ADMIN));
    }
}
