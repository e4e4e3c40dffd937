//! Room tokens: HS256 JWTs whose claims name the user (`sub`), the rooms it may join
//! (`rooms`, `"*"` for any) and an expiry (`exp`, seconds since the epoch).

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use kalphite_sync::ErrorCode;

/// The shortest token secret accepted, in bytes: HS256 tokens signed with a shorter (or
/// empty) key can be forged by guessing it.
pub const MIN_SECRET_BYTES: usize = 32;

/// A token secret shorter than [`MIN_SECRET_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the token secret is {len} bytes long; it must be at least {MIN_SECRET_BYTES} bytes, or \
     tokens can be forged. Make one with `openssl rand -hex 32 > kalphite.secret` and pass \
     --secret-file kalphite.secret (or give no secret: `kalphite serve` then creates one)"
)]
#[non_exhaustive]
pub struct WeakSecret {
    /// The secret's length in bytes.
    pub len: usize,
}

/// Checks that `secret` is long enough to sign tokens with.
///
/// # Errors
/// [`WeakSecret`] when it is shorter than [`MIN_SECRET_BYTES`].
pub fn check_secret(secret: &[u8]) -> Result<(), WeakSecret> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(WeakSecret { len: secret.len() });
    }
    Ok(())
}

/// The claims of a room token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The rooms this token may join; `"*"` allows every room.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Claims {
    /// True when the token allows `room`.
    #[must_use]
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| r == "*" || r == room)
    }
}

/// Why a token was refused, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The hello carried no token and the server is not in open mode.
    #[error("this server requires a token: send one in the hello's 'token' field")]
    Missing,
    /// The token is malformed or its signature does not match.
    #[error("invalid token ({0}); ask for a new one")]
    Invalid(String),
    /// The token has expired.
    #[error("the token has expired; ask for a new one")]
    Expired,
    /// The token does not list the room.
    #[error("the token of user '{user}' does not allow room '{room}'")]
    Forbidden {
        /// The token's user.
        user: String,
        /// The room asked for.
        room: String,
    },
    /// Signing failed.
    #[error("cannot sign a token: {0}")]
    Signing(String),
    /// The secret is too short to sign or check tokens with.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
}

impl AuthError {
    /// The wire error code for this refusal.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Missing | Self::Invalid(_) | Self::Signing(_) | Self::WeakSecret(_) => {
                ErrorCode::Unauthorized
            }
            Self::Expired => ErrorCode::TokenExpired,
            Self::Forbidden { .. } => ErrorCode::Forbidden,
        }
    }
}

/// Signs `claims` with `secret` (HS256).
///
/// # Errors
/// [`AuthError::WeakSecret`] for a secret shorter than [`MIN_SECRET_BYTES`],
/// [`AuthError::Signing`] for a signing failure.
pub fn encode_claims(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    check_secret(secret)?;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Signing(e.to_string()))
}

/// A token for `user`, allowing `rooms` (`"*"` for all), valid for `ttl` from now. This is
/// what `kalphite token` prints.
///
/// ```
/// use std::time::Duration;
/// use kalphite_server::{issue_token, verify_token};
/// let secret = b"at least 32 bytes of random data";
/// let token = issue_token(secret, "alice", &["room-1"], Duration::from_secs(60)).unwrap();
/// let claims = verify_token(secret, &token).unwrap();
/// assert_eq!(claims.sub, "alice");
/// assert!(claims.allows("room-1") && !claims.allows("room-2"));
/// // A short secret is refused.
/// assert!(issue_token(b"secret", "alice", &["room-1"], Duration::from_secs(60)).is_err());
/// ```
///
/// # Errors
/// [`AuthError::WeakSecret`] for a secret shorter than [`MIN_SECRET_BYTES`].
pub fn issue_token(
    secret: &[u8],
    user: &str,
    rooms: &[&str],
    ttl: Duration,
) -> Result<String, AuthError> {
    let claims = Claims {
        sub: user.to_owned(),
        rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
        exp: jsonwebtoken::get_current_timestamp().saturating_add(ttl.as_secs()),
    };
    encode_claims(secret, &claims)
}

/// Checks a token's signature and expiry (no leeway) and returns its claims.
///
/// # Errors
/// [`AuthError::Expired`] or [`AuthError::Invalid`]; [`AuthError::WeakSecret`] for a
/// secret shorter than [`MIN_SECRET_BYTES`] (tokens signed with it prove nothing).
pub fn verify_token(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    check_secret(secret)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })
}

/// Who a valid token lets in, and until when.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The token's user (`sub`).
    pub(crate) user: String,
    /// The token's expiry, seconds since the epoch: the connection is closed then.
    pub(crate) expires: u64,
}

/// Decides who may join `room` with `token`: `Ok(Some(admitted))` for a valid token,
/// `Ok(None)` in open mode without a token (the hello's user id is taken as is, and
/// nothing expires).
pub(crate) fn authorize(
    secret: Option<&[u8]>,
    open: bool,
    token: Option<&str>,
    room: &str,
) -> Result<Option<Admitted>, AuthError> {
    match (token, secret) {
        // Open mode lets in a hello without a token, or any hello when there is no secret.
        (None, _) | (Some(_), None) if open => Ok(None),
        (None, _) => Err(AuthError::Missing),
        (Some(_), None) => Err(AuthError::Invalid(
            "the server has no token secret configured".into(),
        )),
        (Some(token), Some(secret)) => {
            let claims = verify_token(secret, token)?;
            if claims.allows(room) {
                Ok(Some(Admitted {
                    user: claims.sub,
                    expires: claims.exp,
                }))
            } else {
                Err(AuthError::Forbidden {
                    user: claims.sub,
                    room: room.to_owned(),
                })
            }
        }
    }
}
