//! Access control on the `/v1` routes: each route group is wrapped by [`authorize`] with the
//! scope it needs ([`Gate`]).
//!
//! A request shows who it is with `Authorization: Bearer <token>`, or, over mTLS, with a
//! verified client certificate whose subject CN `[[http.tls.clients]]` maps (a token, when
//! sent, decides). No or an unknown token: 401 with `WWW-Authenticate: Bearer`; a principal
//! without the scope, or bound to a tenant on the feature routes (the store is shared by every
//! tenant) or the model administration (so are the routes): 403; over its `max_requests_per_second` or `max_in_flight`: 429 with
//! `Retry-After`. The principal goes on to the handler as an extension, which binds the
//! request's tenant ([`bind_tenant`]). Only the principal's name is ever logged or answered;
//! never the token.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::listen::Peer;
use crate::access::{Access, Principal, Scope};

/// What a route group needs: the configured principals and the scope.
#[derive(Clone)]
pub struct Gate {
    /// The configured principals.
    pub access: Arc<Access>,
    /// The scope the routes behind this gate need.
    pub scope: Scope,
}

/// `{"error": {"kind": kind, "message": message}}` with `status`: the API's error body.
pub(crate) fn refusal(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"kind": kind, "message": message}})),
    )
        .into_response()
}

fn unauthorized(challenge: &'static str, message: String) -> Response {
    let mut response = refusal(StatusCode::UNAUTHORIZED, "unauthorized", message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// 403 `forbidden`.
pub(crate) fn forbidden(message: String) -> Response {
    refusal(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The bearer token of an `Authorization` header: `Ok(None)` without the header, `Err` when
/// it is there but not a bearer token.
fn bearer(request: &Request) -> Result<Option<&[u8]>, ()> {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    let scheme = b"bearer ";
    if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        let token = value[scheme.len()..].trim_ascii();
        if !token.is_empty() {
            return Ok(Some(token));
        }
    }
    Err(())
}

/// Lets the request through to the route when its principal may, or answers 401, 403 or 429.
pub async fn authorize(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let guard = match gate.access.as_ref() {
        Access::Open => return next.run(request).await,
        Access::Guarded(guard) => guard,
    };
    let principal = match bearer(&request) {
        Ok(Some(token)) => match guard.by_token(token) {
            Some(p) => Arc::clone(p),
            None => {
                tracing::debug!(scope = %gate.scope, "HTTP request refused: unknown bearer token");
                return unauthorized(
                    "Bearer error=\"invalid_token\"",
                    "the bearer token is not one of http.tokens".to_owned(),
                );
            }
        },
        Ok(None) => {
            let client = request
                .extensions()
                .get::<ConnectInfo<Peer>>()
                .and_then(|ConnectInfo(peer)| peer.client.clone());
            match client.as_deref().map(|cn| (cn, guard.by_client(cn))) {
                Some((_, Some(p))) => Arc::clone(p),
                Some((cn, None)) => {
                    tracing::debug!(client = cn, scope = %gate.scope, "HTTP request refused: unmapped client certificate");
                    return unauthorized(
                        "Bearer",
                        format!(
                            "the client certificate CN={cn} is not in http.tls.clients, and no bearer token was sent"
                        ),
                    );
                }
                None => {
                    return unauthorized(
                        "Bearer",
                        "send Authorization: Bearer <token> (http.tokens)".to_owned(),
                    );
                }
            }
        }
        Err(()) => {
            return unauthorized(
                "Bearer error=\"invalid_request\"",
                "the Authorization header is not `Bearer <token>`".to_owned(),
            );
        }
    };
    if !principal.may(gate.scope) {
        tracing::debug!(principal = %principal.name, scope = %gate.scope, "HTTP request refused: missing scope");
        return forbidden(format!(
            "{} does not have the `{}` scope",
            principal.name, gate.scope
        ));
    }
    if gate.scope != Scope::Predict
        && let Some(tenant) = &principal.tenant
    {
        tracing::debug!(principal = %principal.name, scope = %gate.scope, "HTTP request refused: tenant-bound principal on a shared route");
        let shared = if gate.scope == Scope::ModelsAdmin {
            "the model routes are shared"
        } else {
            "the feature store is shared"
        };
        return forbidden(format!(
            "{} is bound to tenant `{tenant}`, and {shared} by every tenant",
            principal.name
        ));
    }
    let _permit = match principal.admit() {
        Ok(permit) => permit,
        Err(throttled) => {
            tracing::debug!(principal = %principal.name, limit = throttled.limit, "HTTP request refused: over a per-token limit");
            let secs = throttled.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "{} is over its {}; retry in {secs} s",
                    principal.name, throttled.limit
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The tenant a request acts for, given the one it names and its principal: the principal's
/// when it is bound to one, else the named one. A request naming another tenant than its
/// principal's is refused: the message for the 403 ([`forbidden`]).
pub(crate) fn bind_tenant(
    principal: Option<&Arc<Principal>>,
    named: Option<String>,
) -> Result<Option<String>, String> {
    match (
        principal.and_then(|p| p.tenant.as_ref().map(|t| (p, t))),
        named,
    ) {
        (None, named) => Ok(named),
        (Some((_, bound)), None) => Ok(Some(bound.clone())),
        (Some((_, bound)), Some(named)) if named == *bound => Ok(Some(named)),
        (Some((p, bound)), Some(_)) => Err(format!(
            "{} is bound to tenant `{bound}` and cannot act for another",
            p.name
        )),
    }
}
