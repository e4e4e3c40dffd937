//! The token secret, read the same way by every command that takes one (`serve`, `token`,
//! `bench sync`): `--secret S`, `--secret-file FILE`, or `KALPHITE_AUTH_SECRET`, in that
//! order, and at least [`MIN_SECRET_BYTES`] bytes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
#[cfg(doc)]
use kalphite_server::MIN_SECRET_BYTES;
use kalphite_server::check_secret;

/// The environment variable holding the secret.
pub(crate) const SECRET_ENV: &str = "KALPHITE_AUTH_SECRET";

/// Reads a secret file (surrounding whitespace ignored; an empty file is refused).
pub(crate) fn read_secret(path: &Path) -> Result<String> {
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secret file {}", path.display()))?;
    let secret = secret.trim().to_owned();
    if secret.is_empty() {
        bail!("the secret file {} is empty", path.display());
    }
    Ok(secret)
}

/// Refuses a secret too short to sign tokens with; `source` names where it came from.
pub(crate) fn strong(secret: String, source: &str) -> Result<String> {
    check_secret(secret.as_bytes()).with_context(|| format!("{source} is too short"))?;
    Ok(secret)
}

/// Where a secret was given.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Given {
    /// `--secret` (or its old name `--auth-secret`).
    Flag,
    /// `--secret-file`.
    File(PathBuf),
    /// `KALPHITE_AUTH_SECRET`.
    Env,
}

/// The secret given by `--secret`, `--secret-file` or `KALPHITE_AUTH_SECRET` (flags win
/// over the environment, so `--secret-file` works in a shell that exports the variable),
/// checked for length; `None` when none was given.
///
/// The variable is read here rather than by clap's `env`: clap counts a value from the
/// environment as given, so `--secret-file` would "conflict" with an exported secret.
pub(crate) fn given_secret(
    flag: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<(String, Given)>> {
    if let Some(secret) = flag {
        let secret = strong(secret.to_owned(), "--secret")?;
        return Ok(Some((secret, Given::Flag)));
    }
    if let Some(file) = file {
        let secret = strong(
            read_secret(file)?,
            &format!("the secret in {}", file.display()),
        )?;
        return Ok(Some((secret, Given::File(file.to_owned()))));
    }
    match std::env::var(SECRET_ENV) {
        Ok(secret) => Ok(Some((strong(secret, SECRET_ENV)?, Given::Env))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{SECRET_ENV} is not valid UTF-8"),
    }
}
