//! A string that must never be printed: passwords and API keys.
//!
//! [`Secret`] deserialises from a plain string, but its `Debug`, `Display` and `Serialize`
//! implementations print a fixed mask, so printing or logging a configuration cannot leak it.
//! The only way to the value is [`Secret::expose`], which call sites use at the last moment
//! (building an rdkafka `ClientConfig`, an HTTP header), never for logging.
//!
//! A leaf module: it imports nothing from the crate, so every layer can hold a secret.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret looks like wherever configuration is printed.
pub const REDACTED: &str = "<redacted>";

/// A secret string, redacted in every printed form.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The secret itself. Pass it straight to the component that needs it; never log it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Takes a string; refuses anything else *without quoting it*, unlike serde's default
/// messages ("invalid type: integer `12345`"), which would print an unquoted password.
struct SecretVisitor;

impl SecretVisitor {
    fn refuse<E: serde::de::Error>(found: &str) -> E {
        E::custom(format!(
            "found {found}, expected a string (put the value in quotes; it is not shown here)"
        ))
    }
}

impl<'de> serde::de::Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(Self::refuse("a boolean"))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(Self::refuse("a number"))
    }

    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
        Ok(Secret::new(v.to_string()))
    }

    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(Self::refuse("bytes"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
        // serde_json (built with `arbitrary_precision`) hands over a number that is not a
        // 64-bit integer as a one-entry map under a private key; reading the key shows no
        // value.
        let found = match map.next_key::<String>() {
            Ok(Some(key)) if key.starts_with("$serde_json::private::Number") => "a number",
            _ => "a table",
        };
        Err(Self::refuse(found))
    }
}

/// A connection URL (a DSN such as `postgres://user:password@host:5432/db`) whose password is
/// secret: every printed form (`Debug`, `Display`, `Serialize`) shows the URL with the password
/// (the one in the user-info part, and a `password=` query parameter) replaced by
/// [`REDACTED`], so logs, errors and `inferflow check-config` say which server and user without
/// leaking it. [`SecretUrl::expose`] gives the URL itself, for the database driver only.
#[derive(Clone)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        SecretUrl(Secret::new(value))
    }

    /// The URL with its password. Pass it straight to the driver; never log it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password replaced by [`REDACTED`]: safe to print.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

/// `url` with the password of its user-info part and of any `password=` query parameter
/// replaced by [`REDACTED`]. Text that is not a URL is redacted whole.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return REDACTED.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let (authority, tail) = rest.split_at(authority_len(rest));
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={REDACTED}"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// The length of the authority (`user:password@host:port`) at the start of `rest`, the URL
/// after `scheme://`. The user-info part ends at the last `@`, even past a `/`, `?` or `#`: a
/// password written without percent-encoding may hold those, and is then still found (a `@`
/// in the path or query makes more of the URL count as user-info: redacted, never shown).
fn authority_len(rest: &str) -> usize {
    let host_start = rest.rfind('@').map_or(0, |at| at + 1);
    host_start
        + rest[host_start..]
            .find(['/', '?', '#'])
            .unwrap_or(rest.len() - host_start)
}

/// The password in `url`'s user-info part, if it has one (as written, percent-encoding and all).
pub fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..authority_len(rest)];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, password)| password)
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Secret::deserialize(deserializer).map(SecretUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_form_is_masked() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), REDACTED);
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&secret).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn urls_print_without_their_password() {
        for (url, shown) in [
            (
                "postgres://inferflow:hunter2@db:5432/features?sslmode=require",
                "postgres://inferflow:<redacted>@db:5432/features?sslmode=require",
            ),
            ("mysql://u:p@ss:w@rd@h/db", "mysql://u:<redacted>@h/db"),
            (
                "postgres://db/f?user=u&password=hunter2&x=1",
                "postgres://db/f?user=u&password=<redacted>&x=1",
            ),
            ("postgres://u@db/f", "postgres://u@db/f"),
            // A password with an unencoded `/`, `?` or `#` (a malformed DSN) is still found.
            (
                "postgres://u:pa/ss@h:5432/db",
                "postgres://u:<redacted>@h:5432/db",
            ),
            ("mysql://u:p?w#d@h/db?x=1", "mysql://u:<redacted>@h/db?x=1"),
            ("hunter2", "<redacted>"),
        ] {
            let secret = SecretUrl::new(url);
            assert_eq!(format!("{secret}"), shown);
            assert_eq!(format!("{secret:?}"), shown);
            assert_eq!(
                serde_json::to_string(&secret).unwrap(),
                format!("\"{shown}\"")
            );
            assert_eq!(secret.expose(), url);
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_without_being_quoted() {
        for (doc, found) in [
            (r#"{"s": 9876543210}"#, "a number"),
            (r#"{"s": 98765.4321}"#, "a number"),
            (r#"{"s": true}"#, "a boolean"),
        ] {
            #[derive(Debug, Deserialize)]
            struct Doc {
                #[allow(dead_code)]
                s: Secret,
            }
            let err = serde_json::from_str::<Doc>(doc).unwrap_err().to_string();
            assert!(err.contains(found), "{err}");
            for digits in ["9876543210", "98765", "4321", "true"] {
                assert!(!err.contains(digits), "the value leaked: {err}");
            }
        }
    }
}
