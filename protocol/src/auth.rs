//! How a client proves itself to the NATS server, and what a worker may do there.
//!
//! A credential is one secret string, carried wherever the token always was
//! (`CEDANA_NATS_TOKEN`, `--token-file`, `connection.auth_token`, a worker's user-data):
//! the server's token; `user:<name>:<password>`, a NATS user of its own; on a server the user
//! runs with decentralized auth ([`crate::jwt`]), the account's seed (`SA...`, the driver's) or
//! a user's JWT and seed (`jwt:<jwt>:<seed>`, or a `.creds` file's text). The driver's
//! embedded server gives every worker such a user, with [`worker_permissions`]: it may read
//! its own commands and write its own events, registration, lease and replies, and read and
//! write the job's checkpoints; it cannot command another worker, speak for one, read the
//! job's records or listen to anyone else's answers (its inbox subjects are its own).

use crate::config::Secret;
use crate::names::*;

/// The prefix of a credential that names a user: `user:<name>:<password>`.
pub const USER_PREFIX: &str = "user:";

/// The driver's own user on its embedded server (every permission).
pub const DRIVER_USER: &str = "cedana-driver";

/// What a client sends the server to be let in.
#[derive(Clone, Debug, PartialEq)]
pub enum NatsCredential {
    /// The server's one token (a server configured with `authorization { token }`).
    Token(Secret),
    /// A user of the server's own, with the permissions the server keeps for it.
    User { name: String, password: Secret },
    /// The account's seed (decentralized auth): whoever holds it mints users of the account,
    /// itself one with every permission there.
    Account { seed: Secret },
    /// A user of an account (decentralized auth): its JWT, with the permissions the account
    /// gave it, and the seed it proves itself with.
    Jwt {
        name: String,
        jwt: String,
        seed: Secret,
    },
}

/// The prefix of a credential that is a user JWT and its seed: `jwt:<jwt>:<seed>`.
pub const JWT_PREFIX: &str = "jwt:";

impl NatsCredential {
    /// Reads a credential as written in a token file or `CEDANA_NATS_TOKEN`: a user when it
    /// is `user:<name>:<password>` with a name of `[A-Za-z0-9_-]`, an account when it is an
    /// account's seed, a user JWT when it is `jwt:<jwt>:<seed>` or a `.creds` file, else a
    /// token.
    pub fn parse(secret: &Secret) -> Self {
        let s = secret.expose().trim();
        if s.starts_with("SA") && crate::jwt::account_from_seed(s).is_ok() {
            return NatsCredential::Account {
                seed: Secret::new(s),
            };
        }
        let jwt = s
            .strip_prefix(JWT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .map(|(j, k)| (j.to_string(), k.to_string()))
            .or_else(|| crate::jwt::parse_creds(s));
        if let Some((jwt, seed)) = jwt {
            if let (Ok((name, subject)), Ok(key)) = (
                crate::jwt::user_name_and_key(&jwt),
                nkeys::KeyPair::from_seed(&seed),
            ) {
                if key.public_key() != subject {
                    return NatsCredential::Token(Secret::new(s));
                }
                return NatsCredential::Jwt {
                    name,
                    jwt,
                    seed: Secret::new(seed),
                };
            }
        }
        if let Some((name, password)) = s
            .strip_prefix(USER_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        {
            if crate::ids::valid_id(name) && !password.is_empty() {
                return NatsCredential::User {
                    name: name.to_string(),
                    password: Secret::new(password),
                };
            }
        }
        NatsCredential::Token(Secret::new(s))
    }

    /// The credential as one string, as [`NatsCredential::parse`] reads it.
    pub fn to_secret(&self) -> Secret {
        match self {
            NatsCredential::Token(t) => t.clone(),
            NatsCredential::User { name, password } => {
                Secret::new(format!("{USER_PREFIX}{name}:{}", password.expose()))
            }
            NatsCredential::Account { seed } => seed.clone(),
            NatsCredential::Jwt { jwt, seed, .. } => {
                Secret::new(format!("{JWT_PREFIX}{jwt}:{}", seed.expose()))
            }
        }
    }

    /// The user's name, if it is one.
    pub fn user(&self) -> Option<&str> {
        match self {
            NatsCredential::User { name, .. } | NatsCredential::Jwt { name, .. } => Some(name),
            NatsCredential::Account { .. } => Some(DRIVER_USER),
            NatsCredential::Token(_) => None,
        }
    }

    /// Connect options that send this credential. A user's replies come to inbox subjects of
    /// its own ([`inbox_prefix`]), the only ones its permissions let it listen to.
    pub fn connect_options(&self) -> async_nats::ConnectOptions {
        match self {
            NatsCredential::Token(t) => async_nats::ConnectOptions::with_token(t.expose().into()),
            NatsCredential::User { name, password } => {
                async_nats::ConnectOptions::with_user_and_password(
                    name.clone(),
                    password.expose().into(),
                )
                .custom_inbox_prefix(inbox_prefix(name))
            }
            NatsCredential::Jwt { name, jwt, seed } => {
                let options = jwt_options(jwt, seed);
                if name == DRIVER_USER {
                    options
                } else {
                    options.custom_inbox_prefix(inbox_prefix(name))
                }
            }
            // The account's holder connects as a user of its own, minted now (nothing to
            // tell the server: it trusts what the account signs).
            NatsCredential::Account { seed } => {
                match crate::jwt::account_from_seed(seed.expose())
                    .and_then(|account| crate::jwt::mint_user(&account, DRIVER_USER, None))
                {
                    Ok((jwt, seed)) => jwt_options(&jwt, &Secret::new(seed)),
                    // Not an account's seed after all (made by hand): sent as a token, which
                    // the server refuses.
                    Err(_) => async_nats::ConnectOptions::with_token(seed.expose().into()),
                }
            }
        }
    }

    /// A credential of worker `worker` of job `job` (checkpoints in `bucket`) that only the
    /// worker's subjects accept, minted with this account's seed; `None` unless this is an
    /// account.
    pub fn mint_worker(
        &self,
        job: &str,
        worker: &str,
        bucket: &str,
    ) -> Option<Result<NatsCredential, crate::jwt::JwtError>> {
        let NatsCredential::Account { seed } = self else {
            return None;
        };
        let name = worker_user(worker);
        Some(
            crate::jwt::account_from_seed(seed.expose())
                .and_then(|account| {
                    let p = worker_permissions(job, worker, bucket);
                    crate::jwt::mint_user(&account, &name, Some((&p.publish, &p.subscribe)))
                })
                .map(|(jwt, seed)| NatsCredential::Jwt {
                    name,
                    jwt,
                    seed: Secret::new(seed),
                }),
        )
    }
}

/// Connect options that send user JWT `jwt` and sign the server's nonce with `seed`.
fn jwt_options(jwt: &str, seed: &Secret) -> async_nats::ConnectOptions {
    let key = nkeys::KeyPair::from_seed(seed.expose()).map(std::sync::Arc::new);
    async_nats::ConnectOptions::with_jwt(jwt.to_string(), move |nonce| {
        let key = key.as_ref().map(|k| k.clone()).map_err(|e| e.to_string());
        async move {
            key.map_err(async_nats::AuthError::new)?
                .sign(&nonce)
                .map_err(async_nats::AuthError::new)
        }
    })
}

/// The NATS user of worker `worker` on its job's embedded server.
pub fn worker_user(worker: &str) -> String {
    format!("w-{worker}")
}

/// The inbox subjects of user `name`: `_INBOX_<name>` (the default `_INBOX` stays the
/// driver's).
pub fn inbox_prefix(name: &str) -> String {
    format!("_INBOX_{name}")
}

/// Subjects a user may publish to and subscribe to (NATS wildcards allowed); nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What worker `worker` of job `job` may do on the job's server, and nothing more: read its
/// own commands (its durable consumer, filtered on its own subject, which the server checks
/// against the consumer's config); publish its own events; write its own registration, lease
/// and replies in the KV buckets and read them back; read and write checkpoints in its job's
/// object store `bucket` (a restore reads what another worker wrote), no other job's; listen
/// only on its own inbox subjects.
pub fn worker_permissions(job: &str, worker: &str, bucket: &str) -> Permissions {
    let api = "$JS.API";
    let consumer = command_consumer(job, worker);
    let (wb, rb, cb) = (WORKERS_BUCKET, REPLIES_BUCKET, bucket);
    let key = worker_key(job, worker);
    let mut publish = vec![
        state_subject(job, worker),
        logs_subject(job, worker),
        // Registration, lease, replies.
        format!("$KV.{wb}.{key}"),
        format!("$KV.{wb}.{}", lease_key(job, worker)),
        format!("$KV.{rb}.{key}.*"),
        format!("{api}.DIRECT.GET.KV_{wb}.$KV.{wb}.{key}"),
        format!("{api}.DIRECT.GET.KV_{wb}.$KV.{wb}.{key}.*"),
        format!("{api}.DIRECT.GET.KV_{rb}.$KV.{rb}.{key}.*"),
        // Its commands.
        format!("{api}.CONSUMER.INFO.{COMMANDS_STREAM}.{consumer}"),
        format!(
            "{api}.CONSUMER.CREATE.{COMMANDS_STREAM}.{consumer}.{}",
            commands_subject(job, worker)
        ),
        format!("{api}.CONSUMER.MSG.NEXT.{COMMANDS_STREAM}.{consumer}"),
        format!("$JS.ACK.{COMMANDS_STREAM}.{consumer}.>"),
        // Checkpoints: chunks and infos, read through consumers of their own.
        format!("$O.{cb}.>"),
        format!("{api}.CONSUMER.CREATE.OBJ_{cb}"),
        format!("{api}.CONSUMER.CREATE.OBJ_{cb}.>"),
        format!("{api}.CONSUMER.INFO.OBJ_{cb}.>"),
        format!("{api}.CONSUMER.DELETE.OBJ_{cb}.>"),
        format!("{api}.CONSUMER.MSG.NEXT.OBJ_{cb}.>"),
        format!("{api}.STREAM.MSG.GET.OBJ_{cb}"),
        format!("{api}.DIRECT.GET.OBJ_{cb}.>"),
        format!("{api}.STREAM.PURGE.OBJ_{cb}"),
        format!("$JS.ACK.OBJ_{cb}.>"),
        format!("$JS.FC.OBJ_{cb}.>"),
        format!("{api}.INFO"),
    ];
    for stream in [
        COMMANDS_STREAM.to_string(),
        EVENTS_STREAM.to_string(),
        format!("KV_{wb}"),
        format!("KV_{rb}"),
        format!("OBJ_{cb}"),
    ] {
        publish.push(format!("{api}.STREAM.INFO.{stream}"));
    }
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", inbox_prefix(&worker_user(worker)))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_credential_reads_back_and_anything_else_is_a_token() {
        let c = NatsCredential::User {
            name: "w-w1".into(),
            password: Secret::new("pw:with:colons"),
        };
        assert_eq!(NatsCredential::parse(&c.to_secret()), c);
        for token in ["abc", "user:", "user:bad name:x", "user:w1:", "user:w1"] {
            assert_eq!(
                NatsCredential::parse(&Secret::new(token)),
                NatsCredential::Token(Secret::new(token)),
                "{token}"
            );
        }
    }

    #[test]
    fn an_account_seed_mints_workers_whose_credentials_read_back() {
        let (_, account) = crate::jwt::new_operator_and_account("t").unwrap();
        let acc = NatsCredential::parse(&Secret::new(account.seed().unwrap()));
        assert!(matches!(acc, NatsCredential::Account { .. }), "{acc:?}");
        assert_eq!(acc.user(), Some(DRIVER_USER));
        let w = acc
            .mint_worker("j1", "w2", "b")
            .expect("an account")
            .unwrap();
        assert_eq!(w.user(), Some("w-w2"));
        assert_eq!(NatsCredential::parse(&w.to_secret()), w);
        assert!(
            w.mint_worker("j1", "w3", "b").is_none(),
            "a worker mints nobody"
        );
        // A JWT with a seed that is not its user's is no credential of that user.
        let NatsCredential::Jwt { jwt, .. } = &w else {
            panic!("{w:?}")
        };
        let other = nkeys::KeyPair::new_user().seed().unwrap();
        assert!(matches!(
            NatsCredential::parse(&Secret::new(format!("{JWT_PREFIX}{jwt}:{other}"))),
            NatsCredential::Token(_)
        ));
        // A user seed is no account: a token (which the server refuses).
        let user = nkeys::KeyPair::new_user().seed().unwrap();
        assert!(matches!(
            NatsCredential::parse(&Secret::new(user)),
            NatsCredential::Token(_)
        ));
    }

    #[test]
    fn a_worker_may_touch_its_own_subjects_only() {
        let p = worker_permissions("j1", "w1", &job_checkpoints_bucket("j1"));
        let all = p.publish.join(" ");
        assert!(all.contains("$O.cedana_checkpoints_j1.>"), "{all}");
        assert!(!all.contains("$O.cedana_checkpoints.>"), "{all}");
        assert!(all.contains("CEDANA.j1.w1.state"));
        // Commands are read through its consumer, never published.
        assert!(!p
            .publish
            .iter()
            .any(|s| s.starts_with("CEDANA.") && s.ends_with(".commands")));
        assert!(!all.contains(JOBS_BUCKET), "{all}");
        assert!(!p.publish.iter().any(|s| s.starts_with("CEDANA.*")
            || s.starts_with(">")
            || s == "$JS.API.>"
            || s.starts_with("$KV.*")));
        assert_eq!(p.subscribe, ["_INBOX_w-w1.>"]);
    }
}
