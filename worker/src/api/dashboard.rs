//! The dashboard: one page, its script and its style, built into the
//! binary (no CDN: it works without internet access), served from the API's
//! address and protected like the rest of it.
//!
//! A browser cannot send `Authorization`, so `GET /dashboard?token=TOKEN`
//! (the URL `evalflow dashboard` prints) signs it in: the answer sets the
//! token as an `HttpOnly`, `SameSite=Strict` cookie and sends it on to
//! `/dashboard`, without the token in its address. The cookie counts for
//! `GET` requests only: the page reads, and a page of another site can
//! neither send the cookie (`SameSite=Strict`) nor act with it. The page
//! builds everything it shows from the API's JSON as text (`textContent`),
//! never as HTML, so nothing a submission wrote is ever markup; its
//! Content-Security-Policy allows its own script, style and requests only.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};

/// The cookie the browser keeps the token in.
const COOKIE_NAME: &str = "evalflow_token";

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// What the dashboard's own answers say about where they may go and come from.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                      frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The token a request carries: `Authorization: Bearer`, or for a `GET`
/// the dashboard's cookie.
pub fn presented<B>(request: &Request<B>) -> Option<&[u8]> {
    let headers = request.headers();
    let bearer = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    bearer.or_else(|| (request.method() == Method::GET).then(|| cookie(headers)).flatten())
}

fn cookie(headers: &HeaderMap) -> Option<&[u8]> {
    let prefix = format!("{COOKIE_NAME}=");
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .map(|pair| pair.trim_ascii())
        .find_map(|pair| pair.strip_prefix(prefix.as_bytes()))
}

/// The token of a sign-in request (`GET /dashboard?token=...`).
pub fn sign_in<B>(request: &Request<B>) -> Option<String> {
    if request.method() != Method::GET || request.uri().path() != "/dashboard" {
        return None;
    }
    let fields: Vec<(String, String)> = serde_urlencoded::from_str(request.uri().query()?).ok()?;
    fields.into_iter().find(|(name, _)| name == "token").map(|(_, token)| token)
}

/// The answer to a sign-in with the right `token`: the cookie, and on to the page.
pub fn signed_in(token: &str) -> Response {
    let cookie = format!("{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/");
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/dashboard"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(SET_COOKIE, cookie);
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /dashboard`.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/dashboard.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/dashboard.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
