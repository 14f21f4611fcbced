//! NATS decentralized auth, for a server the user runs (`connection.nats_url`): an operator,
//! one account under it, and a user of its own for each worker, each a JWT signed with the
//! key above it, in the format `nsc` writes and nats-server checks.
//!
//! The server trusts the operator and preloads the account ([`server_config`], written once
//! by `cedana-driver bootstrap --nats-account`). The driver holds the account's seed (its
//! credential: an account in `auth`'s `NatsCredential`) and mints, without telling the server, a user
//! for itself (every permission in the account) and one per worker with
//! a worker's permissions. The server checks each user's JWT against the account's key
//! and the nonce it sent against the user's key; nothing secret is in a JWT.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use nkeys::KeyPair;
use serde_json::{json, Value};

/// Errors making or reading keys and JWTs.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a NATS {what} key: {source}")]
    Key {
        what: &'static str,
        source: nkeys::error::Error,
    },
    #[error("cannot sign a JWT: {0}")]
    Sign(nkeys::error::Error),
    #[error("not a NATS user JWT: {0}")]
    Malformed(String),
}

/// The JWT header every NATS JWT has.
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// `claims` (without `jti`, `iat`, `iss`) signed by `issuer` as a JWT.
fn sign(issuer: &KeyPair, mut claims: Value) -> Result<String, JwtError> {
    let obj = claims.as_object_mut().expect("claims are an object");
    // Its id: each JWT names a new key as its subject, and is made once.
    let jti = obj["sub"].as_str().unwrap_or_default().to_string();
    obj.insert("jti".into(), json!(jti));
    obj.insert("iat".into(), json!(crate::stamp::now()));
    obj.insert("iss".into(), json!(issuer.public_key()));
    let head = URL_SAFE_NO_PAD.encode(HEADER);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{head}.{body}");
    let sig = issuer.sign(signed.as_bytes()).map_err(JwtError::Sign)?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// What a server needs to trust an operator and its accounts: the operator's JWT, its system
/// account's (the server's own; nobody connects to it) and the job account's.
pub struct Trust {
    pub operator: String,
    pub system: (String, String),
    pub account: (String, String),
}

/// A new operator (self-signed), its system account, and an account under it with JetStream
/// and no other limit; the account's key pair is the one whose seed the driver keeps.
pub fn new_operator_and_account(name: &str) -> Result<(Trust, KeyPair), JwtError> {
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let account = KeyPair::new_account();
    let op = sign(
        &operator,
        json!({
            "name": name,
            "sub": operator.public_key(),
            "nats": {
                "type": "operator",
                "system_account": system.public_key(),
                "version": 2,
            },
        }),
    )?;
    let sys = sign(
        &operator,
        json!({
            "name": "SYS",
            "sub": system.public_key(),
            "nats": {
                "limits": { "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1 },
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2,
            },
        }),
    )?;
    let acc = sign(
        &operator,
        json!({
            "name": name,
            "sub": account.public_key(),
            "nats": {
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
                },
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2,
            },
        }),
    )?;
    Ok((
        Trust {
            operator: op,
            system: (system.public_key(), sys),
            account: (account.public_key(), acc),
        },
        account,
    ))
}

/// What a NATS server's config needs to trust the operator and know its accounts (start the
/// server on it, or include it in the server's config; JetStream is enabled there as usual).
pub fn server_config(t: &Trust) -> String {
    format!(
        "# Cedana's NATS operator and account (cedana-driver bootstrap --nats-account).\n\
         # Start nats-server with -c on this file, or include it in the server's config; the\n\
         # driver holds the account's seed and gives each worker a user of its own.\n\
         operator: {}\n\
         system_account: {}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
        t.operator, t.system.0, t.system.0, t.system.1, t.account.0, t.account.1
    )
}

/// The account key pair from its seed (`SA...`).
pub fn account_from_seed(seed: &str) -> Result<KeyPair, JwtError> {
    let kp = KeyPair::from_seed(seed).map_err(|source| JwtError::Key {
        what: "account",
        source,
    })?;
    if kp.key_pair_type() != nkeys::KeyPairType::Account {
        return Err(JwtError::Key {
            what: "account",
            source: nkeys::error::Error::new(
                nkeys::error::ErrorKind::InvalidPrefix,
                Some("the seed is not an account's (SA...)"),
            ),
        });
    }
    Ok(kp)
}

/// A new user `name` of `account`: its JWT and its seed. With `permissions` (publish,
/// subscribe) it may publish and subscribe to those subjects only; without, to anything in
/// the account.
pub fn mint_user(
    account: &KeyPair,
    name: &str,
    permissions: Option<(&[String], &[String])>,
) -> Result<(String, String), JwtError> {
    let user = KeyPair::new_user();
    let mut nats = json!({
        "subs": -1, "data": -1, "payload": -1,
        "type": "user",
        "version": 2,
    });
    if let Some((publish, subscribe)) = permissions {
        nats["pub"] = json!({ "allow": publish });
        nats["sub"] = json!({ "allow": subscribe });
    }
    let jwt = sign(
        account,
        json!({ "name": name, "sub": user.public_key(), "nats": nats }),
    )?;
    let seed = user.seed().map_err(JwtError::Sign)?;
    Ok((jwt, seed))
}

/// The `name` claim of a user JWT (not verified: the server does that).
pub fn user_name(jwt: &str) -> Result<String, JwtError> {
    user_name_and_key(jwt).map(|(name, _)| name)
}

/// The `name` and `sub` (the user's public key) claims of a user JWT (not verified: the
/// server does that).
pub fn user_name_and_key(jwt: &str) -> Result<(String, String), JwtError> {
    let body = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| JwtError::Malformed("no claims part".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(body.trim_end_matches('='))
        .map_err(|e| JwtError::Malformed(e.to_string()))?;
    let claims: Value =
        serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(e.to_string()))?;
    if claims["nats"]["type"] != "user" {
        return Err(JwtError::Malformed("its type is not user".into()));
    }
    Ok((
        claims["name"].as_str().unwrap_or_default().to_string(),
        claims["sub"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The JWT and seed of a `.creds` file's text (as `nsc` writes them), if it is one.
pub fn parse_creds(text: &str) -> Option<(String, String)> {
    let block = |begin: &str| -> Option<String> {
        let start = text.find(begin)? + begin.len();
        let rest = &text[start..];
        let rest = &rest[rest.find('\n')? + 1..];
        let end = rest.find("------END")?;
        Some(rest[..end].trim().to_string())
    };
    let jwt = block("-----BEGIN NATS USER JWT-----")?;
    let seed = block("-----BEGIN USER NKEY SEED-----")?;
    (!jwt.is_empty() && !seed.is_empty()).then_some((jwt, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jwt: &str) -> Value {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
    }

    #[test]
    fn a_user_jwt_is_signed_by_its_account_and_carries_its_permissions() {
        let (t, account) = new_operator_and_account("cedana").unwrap();
        let (op, acc) = (&t.operator, &t.account.1);
        assert_eq!(claims(&t.system.1)["iss"], claims(op)["sub"]);
        assert_eq!(claims(op)["nats"]["system_account"], t.system.0.as_str());
        assert!(server_config(&t).contains(&format!("system_account: {}", t.system.0)));
        assert_eq!(claims(acc)["iss"], claims(op)["sub"]);
        assert_eq!(claims(acc)["sub"], account.public_key());
        let (publish, subscribe) = (
            vec!["CEDANA.j1.w1.state".to_string()],
            vec!["_INBOX_w-w1.>".to_string()],
        );
        let (jwt, seed) = mint_user(&account, "w-w1", Some((&publish, &subscribe))).unwrap();
        let c = claims(&jwt);
        assert_eq!(c["iss"], account.public_key());
        assert_eq!(c["nats"]["pub"]["allow"][0], "CEDANA.j1.w1.state");
        assert_eq!(c["nats"]["sub"]["allow"][0], "_INBOX_w-w1.>");
        assert_eq!(user_name(&jwt).unwrap(), "w-w1");
        // The signature is the account's over the first two parts.
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        KeyPair::from_public_key(&account.public_key())
            .unwrap()
            .verify(signed.as_bytes(), &sig)
            .expect("signed by the account");
        // The seed is the user's whose public key the JWT names.
        assert_eq!(
            KeyPair::from_seed(&seed).unwrap().public_key(),
            c["sub"].as_str().unwrap()
        );
        // A driver's user has no permissions block: everything in the account.
        let (jwt, _) = mint_user(&account, "cedana-driver", None).unwrap();
        assert!(claims(&jwt)["nats"].get("pub").is_none());
    }

    #[test]
    fn only_an_account_seed_is_an_account() {
        let (_, account) = new_operator_and_account("x").unwrap();
        assert!(account_from_seed(&account.seed().unwrap()).is_ok());
        assert!(account_from_seed(&KeyPair::new_user().seed().unwrap()).is_err());
        assert!(account_from_seed("not a seed").is_err());
    }

    #[test]
    fn a_creds_file_reads_back() {
        let text = "-----BEGIN NATS USER JWT-----\neyJ.a.b\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below\n\n-----BEGIN USER NKEY SEED-----\nSUAXYZ\n------END USER NKEY SEED------\n";
        assert_eq!(
            parse_creds(text),
            Some(("eyJ.a.b".to_string(), "SUAXYZ".to_string()))
        );
        assert_eq!(parse_creds("just a token"), None);
    }
}
